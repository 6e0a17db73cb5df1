"""DDP: two CPU processes (gloo) train to the same weights as one process on the same global batches."""
import datetime
import gc
import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import robustsparse.attacks.trades as trades_module
from robustsparse.config import load_config
from robustsparse.runs.checkpoint import find_checkpoint, load_checkpoint
from robustsparse.runs.logger import read_metrics
from robustsparse.train import train

# A tiny digits cnn for one epoch of 10 steps. Ranks draw their own attack random starts (by design, see
# robustsparse/train/distributed.py), so the step must have no random draws for the runs to agree point by point:
# PGD without random start, and TRADES with its start noise replaced by a fixed function of each image (below).
# BN is synchronised across ranks (train.sync_bn, the default).
#
# Why float64 (issue 14). The single process sees batches of 128 and each rank 64, so the kernels (and on another
# CPU family, another oneDNN/MKL code path) sum in another order. In float32 that is a last-bit difference in a
# gradient, and PGD's sign() turns it into a full ±α step on that pixel: ten PGD-AT steps later the weights differed
# by 3.5e-3 on an AMX Xeon while agreeing on an AMD EPYC. In float64 the same reordering is ~1e-16 relative, far
# below any gradient entry PGD takes the sign of, so sign() flips only at exact ties and the runs stay equal to
# ~1e-12 on any CPU. The whole run is float64 (default dtype, inputs cast up at every module, BN statistics, all-
# reduces, checkpoints); train.amp=fp32 pins the precision so no autocast downcasts it.
# Tolerance ATOL = 1e-8. Measured on an AMX Xeon: the largest difference of any weight, BN statistic or momentum
# entry is 1e-14. Gradients summed instead of averaged across ranks put them 0.6-1.8 off, and BN left unsynchronised
# 0.2 off (both mutations run by hand, see the issue-14 note), so the test still proves what it is for.
TINY = ["train.epochs=1", "model.options={width: 8}", "attack.steps=2", "train.val_attack_steps=1",
        "train.batch_size=128", "attack.random_start=false", "data.val_size=60", "train.lr=0.2",
        "train.schedule=constant", "train.amp=fp32"]
METHODS = ("pgd_at", "standard", "trades")
ATOL = 1e-8
DEADLINE_S = 300  # the whole 2-process job (~20 s alone; 120 s ran out twice under load ~11): a hang fails the test, not CI


class _FixedStartNoise:
    """``torch`` as seen by attacks/trades.py, except that the start noise of KL-PGD is a fixed function of the
    pixels (the same on any rank and at any batch position) instead of a draw from the global RNG."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def randn_like(x):
        return torch.sin(x * 1e4 + 1.0)


def _to_float64(module, args):
    """Global forward pre-hook: float32 tensors (the float32 images the data readers give) enter every module in
    float64, so the whole computation is double precision while the library code stays as users run it."""
    return tuple(a.double() if torch.is_tensor(a) and a.dtype == torch.float32 else a for a in args)


def _float64_everywhere():
    """Default dtype float64 (models, BN statistics, accumulators) plus the input cast; returns an undo function."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(_to_float64)

    def undo():
        handle.remove()
        torch.set_default_dtype(previous)
    return undo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, jobs: list) -> None:
    """One process, set up as torchrun sets up its workers, running the real CLI once per job. It joins the process
    group itself first (as a user script may), so the trainer must use that group and leave it open."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    import torch.distributed as dist

    from robustsparse.cli import main
    trades_module.torch = _FixedStartNoise()
    _float64_everywhere()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    for out, overrides in jobs:
        code = main(["train", "digits_pgdat", *overrides, "--out", out, "--no-progress"])
        if code:
            raise SystemExit(code)
    assert dist.is_initialized()  # the trainer left the caller's group open
    # Tear down while the interpreter is fully alive, then leave without finalisation. CI once saw rank 1 die with
    # SIGABRT ("terminate called without an active exception") after all three jobs: gloo worker threads still
    # holding tensors of the DDP models when the interpreter finalises (pytorch/pytorch#179291 describes it). The
    # runs are on disk by then (atomic writes, checked below); process teardown is not what this test tests.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_ddp(jobs: list, world: int = 2) -> None:
    ctx = mp.start_processes(_rank_main, args=(world, _free_port(), jobs), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process run did not finish in {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _weights(run: str) -> dict:
    tensors, _ = load_checkpoint(find_checkpoint(os.path.join(run, "checkpoints"), prefer="last"))
    return tensors


def _assert_same_run(single: str, ddp: str, atol: float = ATOL, metric_tol: float = 1e-6) -> dict:
    # metric_tol: the metrics are count ratios, which one path rounds to float32 (~1e-8) and the other reduces in
    # float64; one sample counted differently moves them by 1/60 at least
    a, b = _weights(single), _weights(ddp)
    assert a.keys() == b.keys()
    for key in a:  # weights, BN running statistics, momentum buffers
        assert a[key].dtype == b[key].dtype == torch.float64 or not a[key].is_floating_point(), key  # really float64
        assert torch.allclose(a[key].double(), b[key].double(), rtol=0, atol=atol), \
            (key, (a[key].double() - b[key].double()).abs().max().item())
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("momentum_buffer"))  # it really trained
    rows = [read_metrics(run)[0] for run in (single, ddp)]  # metrics summed over ranks, validation sharded
    for key in rows[0]:
        if key not in ("seconds", "val_robust_acc"):
            assert rows[0][key] == pytest.approx(rows[1][key], abs=metric_tol), key
    # each rank's validation PGD draws its own random start: equal in distribution, not point by point
    assert abs(rows[0]["val_robust_acc"] - rows[1]["val_robust_acc"]) <= 0.1
    for folder in ("", "checkpoints"):  # one writer: the files of a single-process run, nothing per rank
        names = [sorted(n.split(".")[0] for n in os.listdir(os.path.join(run, folder))) for run in (single, ddp)]
        assert names[0] == names[1], folder
    return rows[0]


def test_two_gloo_processes_equal_one_process(tmp_path, monkeypatch):
    """pgd_at, standard and trades (attack forwards past DDP; trades: two training forwards before one
    backward) under 2-process DDP reach the single-process weights within float64 tolerance."""
    monkeypatch.setattr(trades_module, "torch", _FixedStartNoise())
    jobs = {m: TINY + [f"train.method={m}"] for m in METHODS}
    undo = _float64_everywhere()
    try:
        for method in METHODS:
            train(load_config("digits_pgdat", jobs[method]), str(tmp_path / f"single-{method}"), progress=False)
    finally:
        undo()
    _run_ddp([(str(tmp_path / f"ddp-{m}"), jobs[m]) for m in METHODS])
    rows = {m: _assert_same_run(str(tmp_path / f"single-{m}"), str(tmp_path / f"ddp-{m}")) for m in METHODS}
    assert rows["pgd_at"]["val_clean_acc"] > 0.15  # it learnt something, so equal validation numbers mean something
