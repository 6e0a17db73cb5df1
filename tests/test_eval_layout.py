"""How the evaluator runs the model on CPU, without changing what it computes: the memory layout (``channels_last``,
auto) and micro-batching (``micro_batch``, auto). The caller's model is given back untouched, the choices are
recorded and resume consistently, and each computes what the plain path computes (up to summation order)."""
import json

import pytest
import torch
from torch import nn

import robustsparse as rs
from robustsparse.attacks.base import MicroBatched, activation_bytes_per_image, channels_last_weights
from robustsparse.errors import UserError
from robustsparse.eval import evaluator as ev


def _tensors(model):
    return [t for t in (*model.parameters(), *model.buffers())]


def test_the_caller_gets_its_own_tensors_back_even_after_an_error():
    model = rs.build_model("resnet18", 3, 10, (32, 32))  # BN buffers are 1-D, conv weights 4-D
    before = [(t, t.data.data_ptr(), t.stride(), t.clone()) for t in _tensors(model)]
    with pytest.raises(RuntimeError, match="planted"):
        with channels_last_weights(model):
            convs = [t for t in _tensors(model) if t.dim() == 4]
            assert convs and all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                                 for t in convs if t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1)
            raise RuntimeError("planted")
    after = _tensors(model)
    assert len(after) == len(before)
    for t, (orig, ptr, stride, values) in zip(after, before):
        assert t is orig and t.data_ptr() == ptr and t.stride() == stride and torch.equal(t, values)


def test_auto_is_nhwc_for_convolutions_on_cpu_and_is_recorded(robust_digits_model, digits_test, monkeypatch):
    x, y = digits_test[0][:32], digits_test[1][:32]
    monkeypatch.delenv(ev.CHANNELS_LAST_ENV, raising=False)
    assert rs.evaluate(robust_digits_model, x, y, suite="clean", eps=0.1, progress=False).layout == "channels_last"
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # no 4-D weight: nothing to gain, NCHW
    assert rs.evaluate(mlp, x, y, suite="clean", eps=0.1, progress=False, run_checks=False).layout == "nchw"
    assert rs.evaluate(robust_digits_model, x, y, suite="clean", eps=0.1, progress=False,
                       channels_last=False).layout == "nchw"
    monkeypatch.setenv(ev.CHANNELS_LAST_ENV, "0")
    assert rs.evaluate(robust_digits_model, x, y, suite="clean", eps=0.1, progress=False).layout == "nchw"
    assert rs.evaluate(robust_digits_model, x, y, suite="clean", eps=0.1, progress=False,
                       channels_last=True).layout == "channels_last"  # the caller's word beats the environment
    assert "layout" in rs.evaluate(robust_digits_model, x, y, suite="clean", eps=0.1, progress=False).to_dict()


def test_a_state_from_before_layouts_resumes_in_nchw_and_a_layout_change_is_refused(robust_digits_model,
                                                                                    digits_test, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.delenv(ev.CHANNELS_LAST_ENV, raising=False)
    x, y = digits_test[0][:24], digits_test[1][:24]
    state = tmp_path / "state.json"
    first = rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-3", eps=0.1, progress=False,
                        state_path=str(state), channels_last=False)
    assert "layout" not in json.loads(state.read_text())["signature"]  # as written before layouts existed
    again = rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-3", eps=0.1, progress=False,
                        state_path=str(state))  # auto: the state's own layout, read back, nothing recomputed
    assert again.layout == "nchw" and again.accuracy == first.accuracy
    with pytest.raises(UserError, match="layout"):
        rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-3", eps=0.1, progress=False,
                    state_path=str(state), channels_last=True)
    nhwc_state = tmp_path / "nhwc.json"
    rs.evaluate(robust_digits_model, x, y, suite="clean", eps=0.1, progress=False, state_path=str(nhwc_state))
    assert json.loads(nhwc_state.read_text())["signature"]["layout"] == "channels_last"


def test_nhwc_computes_what_nchw_computes(robust_digits_model, digits_test):
    """Logits agree to float rounding (the summation order is all that differs), so every clean flag whose top-2
    logit gap exceeds that rounding agrees; PGD's accuracy, whose sign() can turn rounding into a different
    path at a margin point, stays within 3 of the 120 points on any CPU."""
    x, y = digits_test[0][:120], digits_test[1][:120]
    model = robust_digits_model.eval()
    with torch.no_grad():
        nchw = model(x)
        with channels_last_weights(model):
            nhwc = model(x)
    assert torch.allclose(nchw, nhwc, rtol=1e-4, atol=1e-4)  # loose: another CPU family, other kernels
    top2 = nchw.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert clear.float().mean() > 0.9 and torch.equal(nchw.argmax(1)[clear], nhwc.argmax(1)[clear])
    a, b = (rs.evaluate(model, x, y, suite="clean,pgd-10", eps=0.1, progress=False, channels_last=cl)
            for cl in (False, True))
    assert a.accuracy["clean"] == pytest.approx(b.accuracy["clean"], abs=1 / 120 + 1e-9)
    assert abs(a.accuracy["pgd-10"] - b.accuracy["pgd-10"]) <= 3 / 120 + 1e-9
    assert 0 < a.accuracy["pgd-10"] < a.accuracy["clean"]  # the comparison is of a partly robust model


def test_micro_batching_is_the_same_function_and_gradient(robust_digits_model, digits_test):
    x, y = digits_test[0][:50], digits_test[1][:50]
    model = robust_digits_model.eval()
    results = []
    for forward in (model, MicroBatched(model, 8), MicroBatched(model, 64)):
        xi = x.clone().requires_grad_(True)
        out = forward(xi)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y, reduction="sum"), xi)
        results.append((out.detach(), grad))
    for out, grad in results[1:]:  # per image the same computation; kernels may differ by batch size
        assert torch.allclose(out, results[0][0], rtol=1e-4, atol=1e-4)
        assert (grad - results[0][1]).abs().max() <= 1e-3 * results[0][1].abs().max()
    assert results[0][1].abs().sum() > 0


def test_auto_micro_batch_follows_the_activation_size(robust_digits_model, digits_test, monkeypatch):
    monkeypatch.delenv(ev.MICRO_BATCH_ENV, raising=False)
    fmnist = rs.build_model("smallcnn", 1, 10, (28, 28))
    per_image = activation_bytes_per_image(fmnist, torch.rand(1, 28, 28))
    assert per_image == 32 * 26 * 26 * 4  # conv1's output, the largest map
    x = torch.rand(40, 1, 28, 28)
    y = torch.randint(0, 10, (40,))
    res = rs.evaluate(fmnist, x, y, suite="clean", eps=0.1, progress=False, run_checks=False, batch_size=500)
    assert res.micro_batch == ev.ACTIVATION_BUDGET_BYTES // per_image == 72
    # the chunk is already that small: nothing to split
    assert rs.evaluate(fmnist, x, y, suite="clean", eps=0.1, progress=False, run_checks=False,
                       batch_size=64).micro_batch is None
    xd, yd = digits_test[0][:40], digits_test[1][:40]
    assert rs.evaluate(robust_digits_model, xd, yd, suite="clean", eps=0.1, progress=False).micro_batch is None
    assert rs.evaluate(robust_digits_model, xd, yd, suite="clean", eps=0.1, progress=False,
                       micro_batch=16).micro_batch == 16
    monkeypatch.setenv(ev.MICRO_BATCH_ENV, "0")
    assert rs.evaluate(fmnist, x, y, suite="clean", eps=0.1, progress=False, run_checks=False,
                       batch_size=500).micro_batch is None
    with pytest.raises(UserError, match="micro_batch"):
        rs.evaluate(fmnist, x, y, suite="clean", eps=0.1, progress=False, micro_batch=-1)


def test_micro_batching_keeps_the_chunks_and_their_random_draws(robust_digits_model, digits_test):
    """Split 4 ways inside each chunk of 64, PGD with a random start gives what the whole chunk gives: the random
    draws are the chunk's (seeded per chunk), and per image the arithmetic is the same."""
    x, y = digits_test[0][:128], digits_test[1][:128]
    a, b = (rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-10", eps=0.1, progress=False, batch_size=64,
                        channels_last=False, micro_batch=mb) for mb in (0, 16))
    assert a.micro_batch is None and b.micro_batch == 16
    assert a.accuracy["clean"] == pytest.approx(b.accuracy["clean"], abs=1 / 128 + 1e-9)  # a near-tie may round
    assert abs(a.accuracy["pgd-10"] - b.accuracy["pgd-10"]) <= 3 / 128 + 1e-9
    assert 0 < a.accuracy["pgd-10"] < a.accuracy["clean"]
