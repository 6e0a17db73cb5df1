"""The training engine: attacks never compute parameter gradients; AMP, channels_last and the config options."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import robustsparse as rs
from robustsparse.attacks import PGD, TradesKL
from robustsparse.config import load_config
from robustsparse.errors import UserError
from robustsparse.sparse import apply_mask, masks_from_scores, prunable_parameters
from robustsparse.train.engine import Engine
from robustsparse.train.objectives import build_objective

CPU = torch.device("cpu")


def cnn(width=8):
    torch.manual_seed(0)
    return rs.build_model("cnn", 1, 10, (8, 8), width=width)


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _count_param_grad_calls(model):
    """Tensor hooks on every parameter: they run whenever autograd computes that parameter's gradient."""
    calls = []
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("make_attack", [lambda m: PGD(m, 0.1, steps=3), lambda m: TradesKL(m, 0.1, steps=3)],
                         ids=["pgd", "trades-kl"])
def test_attack_steps_compute_no_parameter_gradient(make_attack):
    model = cnn().train()
    calls = _count_param_grad_calls(model)
    x, y = batch()
    x_adv = make_attack(model)(x, y)
    assert not torch.equal(x_adv, x)  # the attack did run its gradient steps
    assert calls == [] and all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training  # restored afterwards
    F.cross_entropy(model(x_adv), y).backward()  # the training backward does compute them, once each
    assert sorted(calls) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_objective_attack_leaves_parameter_grads_none(method):
    model = cnn().train()
    cfg = load_config("digits_pgdat", [f"train.method={method}", "attack.steps=2"])
    calls = _count_param_grad_calls(model)
    out = build_objective(model, cfg)(*batch())
    assert calls == [] and all(p.grad is None for p in model.parameters())  # attack + loss forward: no grads yet
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_config_engine_options_are_checked():
    cfg = load_config("digits_pgdat", ["train.amp=bf16", "train.channels_last=true", "train.compile=false"])
    assert (cfg.train.amp, cfg.train.channels_last, cfg.train.compile, cfg.train.sync_bn) == ("bf16", True, False,
                                                                                              True)
    assert load_config("digits_pgdat").train.channels_last is None  # auto
    with pytest.raises(UserError, match="train.amp"):
        load_config("digits_pgdat", ["train.amp=fp8"])
    with pytest.raises(UserError, match="channels_last"):
        load_config("digits_pgdat", ["train.channels_last=sometimes"])


def test_engine_defaults_on_cpu_are_plain(monkeypatch):
    # on a CPU without native bf16; tests/test_precision.py covers the one with it (auto = bf16 there)
    from robustsparse.train import precision
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: None)
    engine = Engine.create(CPU)
    assert (engine.amp, engine.channels_last, engine.compile, engine.scaler, engine.world_size) == \
        ("fp32", False, False, None, 1)
    model = cnn()
    assert engine.prepare_model(model) is model  # nothing wrapped, nothing converted
    x = torch.rand(2, 1, 8, 8)
    assert engine.layout(x) is x


def _one_step(engine, model, x, y, method="pgd_at"):
    cfg = load_config("digits_pgdat", ["attack.steps=2", f"train.method={method}"])
    objective = build_objective(engine.prepare_model(model), cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(3)
    model.train()
    out = engine.step(objective, optimizer, x, y)
    return out, optimizer


@pytest.mark.parametrize("method,dtype,tol", [
    # PGD-AT in float64: NHWC and NCHW convolutions sum in another order, and PGD's sign() turns a last-bit
    # difference in an input gradient into a full alpha step. In float64 the orders agree to ~1e-16 (measured
    # 6e-17 on AVX-512, AVX2 and oneDNN-off kernels), so a sign can only flip at an exact tie.
    ("pgd_at", torch.float64, 1e-10),
    # float32 (oneDNN's NHWC kernels) without an attack: one SGD step, no sign(), so the difference stays at
    # float32 rounding of the gradients (measured 0-3e-8)
    ("standard", torch.float32, 1e-5)])
def test_channels_last_step_equals_the_contiguous_step(method, dtype, tol):
    x, y = batch()
    x = x.to(dtype)
    plain, nhwc = cnn().to(dtype), cnn().to(dtype)
    out_a, _ = _one_step(Engine.create(CPU), plain, x, y, method)
    out_b, _ = _one_step(Engine.create(CPU, channels_last=True), nhwc, x, y, method)
    assert nhwc.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_a.loss, out_b.loss, rtol=0, atol=tol)
    for p, q in zip(plain.parameters(), nhwc.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=tol)
    assert any(not torch.equal(p, q) for p, q in zip(cnn().to(dtype).parameters(), plain.parameters()))  # it stepped


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_keeps_fp32_master_weights_and_masks_exact(amp):
    model = cnn()
    mask = masks_from_scores({k: p.abs() for k, p in prunable_parameters(model).items()}, 0.3)
    apply_mask(model, mask)
    engine = Engine.create(CPU, amp=amp)
    assert engine.autocast() is not None and (engine.scaler is not None) == (amp == "fp16")
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        out, optimizer = _one_step(engine, model, *batch())
    assert torch.isfinite(out.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # it trained
    for k, p in prunable_parameters(model).items():
        assert (p.detach()[mask[k] == 0] == 0).all(), k
    if amp == "fp16":  # the loss scale travels in checkpoints (JSON)
        state = engine.state_dict()
        fresh = Engine.create(CPU, amp="fp16")
        fresh.load_state_dict(state)
        assert fresh.scaler.get_scale() == engine.scaler.get_scale()


def test_trainer_runs_with_engine_options(tmp_path):
    """bf16 autocast + channels_last on CPU through the real trainer; checkpoints load into a plain model."""
    out = str(tmp_path / "run")
    cfg = load_config("digits_pgdat", ["train.epochs=1", "model.options={width: 4}", "attack.steps=1",
                                       "train.val_attack_steps=1", "train.batch_size=256", "data.val_size=40",
                                       "train.amp=bf16", "train.channels_last=true"])
    rs.train(cfg, out, progress=False)
    with open(f"{out}/run.json") as fh:
        status = json.load(fh)
    assert status["engine"]["amp"] == "bf16" and status["engine"]["channels_last"] is True
    model = rs.load(out, which="last")
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_cli_thread_cap(monkeypatch):
    from robustsparse.utils import threads
    assert 1 <= threads.usable_cpus() <= (os.cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "usable_cpus", lambda: 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.configure_threads() == 2  # the user's choice wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        assert threads.configure_threads() == 1  # capped at the usable cores
    finally:
        torch.set_num_threads(before)
