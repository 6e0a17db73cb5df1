"""The GPU path (skipped without CUDA; run by scripts/gpu_check.sh on a lent GPU): bf16 autocast, channels_last,
torch.compile and a one-process NCCL DDP step each take the same step as the plain fp32 engine up to a stated
tolerance, keep fp32 master weights, and keep masked weights exactly zero.

Tolerances: cuDNN picks a convolution algorithm per layout, and "fp32" convolutions may run in TF32 (torch's
default for cuDNN: 10-bit mantissa, ~1e-3 relative), so two layouts of the same fp32 step agree to ~1e-3, not
bit for bit; bf16 (8-bit mantissa) to ~1e-2 in the loss after a couple of steps.
"""
import os

import pytest
import torch

import robustsparse as rs
from robustsparse.config import load_config
from robustsparse.sparse import apply_mask, masks_from_scores, prunable_parameters
from robustsparse.train.engine import Engine
from robustsparse.train.objectives import build_objective

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _model(masked=False):
    torch.manual_seed(0)
    model = rs.build_model("cnn", 1, 10, (8, 8), width=16).to(CUDA)
    mask = None
    if masked:
        mask = masks_from_scores({k: p.abs() for k, p in prunable_parameters(model).items()}, 0.3)
        apply_mask(model, mask)
    return model, mask


def _batch(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g).to(CUDA), torch.randint(0, 10, (n,), generator=g).to(CUDA)


def _train(engine, model, steps=3):
    objective = build_objective(engine.prepare_model(model), load_config("digits_pgdat", ["attack.steps=3"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    losses = []
    for step in range(steps):
        torch.manual_seed(10 + step)
        model.train()
        losses.append(engine.step(objective, optimizer, *_batch(seed=step)).loss.item())
    return losses, optimizer


def _assert_close_models(a, b, atol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=atol), (name, (p - q).abs().max().item())


def _assert_masked_zero(model, mask):
    for k, p in prunable_parameters(model).items():
        assert (p.detach()[mask[k] == 0] == 0).all(), k


def test_auto_on_cuda_is_bf16_or_fp16_with_channels_last():
    engine = Engine.create(CUDA)
    assert engine.amp == ("bf16" if torch.cuda.is_bf16_supported() else "fp16") and engine.channels_last
    assert engine.describe()["amp_reason"].startswith("auto: cuda")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_with_fp32_master_weights_and_exact_masks(amp):
    ref, _ = _model(masked=True)
    model, mask = _model(masked=True)
    ref_losses, _ = _train(Engine.create(CUDA, amp="fp32", channels_last=False), ref)
    losses, optimizer = _train(Engine.create(CUDA, amp=amp, channels_last=False), model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    assert losses == pytest.approx(ref_losses, rel=3e-2, abs=3e-2)  # bf16/fp16 rounding, see the module docstring
    _assert_masked_zero(model, mask)


def test_channels_last_takes_the_fp32_step():
    a, _ = _model()
    b, _ = _model()
    la, _ = _train(Engine.create(CUDA, amp="fp32", channels_last=False), a)
    lb, _ = _train(Engine.create(CUDA, amp="fp32", channels_last=True), b)
    assert b.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert lb == pytest.approx(la, rel=2e-3, abs=2e-3)  # TF32 / algorithm choice per layout
    _assert_close_models(a, b, atol=2e-3)


def test_compile_takes_the_eager_step_and_keeps_masks_exact():
    a, _ = _model(masked=True)
    b, mask = _model(masked=True)
    la, _ = _train(Engine.create(CUDA, amp="fp32", channels_last=False), a)
    lb, _ = _train(Engine.create(CUDA, amp="fp32", channels_last=False, compile=True), b)
    assert lb == pytest.approx(la, rel=2e-3, abs=2e-3)  # Inductor's fused kernels round differently
    _assert_close_models(a, b, atol=2e-3)
    _assert_masked_zero(b, mask)


def test_everything_on_keeps_masks_exact():
    model, mask = _model(masked=True)
    losses, _ = _train(Engine.create(CUDA, amp="bf16", channels_last=True, compile=True), model, steps=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    _assert_masked_zero(model, mask)


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
def test_one_process_nccl_ddp_takes_the_single_process_step(tmp_path, monkeypatch):
    """World size 1 through the real DDP wrapper and NCCL all-reduces: the same step as no DDP (the gradient
    all-reduce of one rank is the identity; SyncBN over one rank is BN)."""
    import torch.distributed as dist
    ref, _ = _model(masked=True)
    la, _ = _train(Engine.create(CUDA, amp="fp32", channels_last=False), ref)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, mask = _model(masked=True)
        engine = Engine.create(CUDA, amp="fp32", channels_last=False, distributed_env=True)
        assert engine.dist is not None and engine.world_size == 1
        lb, _ = _train(engine, model)
        total = engine.sum_over_ranks(torch.ones(3, device=CUDA))
        assert total.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()
    assert lb == pytest.approx(la, rel=2e-3, abs=2e-3)  # SyncBN's fp32 statistics path vs cuDNN's BN kernel
    _assert_close_models(ref, model, atol=2e-3)
    _assert_masked_zero(model, mask)


def test_the_evaluator_is_fp32_on_cuda_inside_a_bf16_autocast():
    model, _ = _model()
    model.eval()
    x, y = _batch(48)
    kwargs = dict(suite="clean,pgd-5", eps=0.1, num_classes=10, batch_size=16, progress=False)
    torch.manual_seed(0)
    plain = rs.evaluate(model, x, y, **kwargs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.manual_seed(0)
        mixed = rs.evaluate(model, x, y, **kwargs)
    assert mixed.accuracy == plain.accuracy


if os.environ.get("ROBUSTSPARSE_CUDA_TESTS_REQUIRED") == "1" and not torch.cuda.is_available():
    raise RuntimeError("ROBUSTSPARSE_CUDA_TESTS_REQUIRED=1 but CUDA is not available")  # gpu_check.sh sets it
