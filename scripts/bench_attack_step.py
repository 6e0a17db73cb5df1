"""One attack step's cost on CPU by memory layout and micro-batch size: what the evaluator's defaults rest on.

    python scripts/bench_attack_step.py RUN [--images 512] [--sizes 32,64,128,256,512] [--repeats 5]

For a trained run's model (fp32, eval mode, parameter gradients off) and the first ``--images`` test images of
its dataset it times, median of ``--repeats``: a forward + input gradient (an attack step: PGD, APGD, FAB) and a
forward alone (Square, the clean and final checks), with the weights in NCHW and in NHWC memory, running the model
``size`` images at a time (`attacks.base.MicroBatched`). It also checks that every micro-batch size gives the
whole batch's outputs and input gradients bit for bit on this machine (printed; not assumed elsewhere).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import robustsparse as rs
from robustsparse.attacks.base import MicroBatched, channels_last_weights
from robustsparse.config import config_from_dict
from robustsparse.data.registry import load_split
from robustsparse.runs.machine import machine_line


def _once(model, x, y, size, grad):
    forward = MicroBatched(model, size)
    xa = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = forward(xa)
        if not grad:
            return out, None
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y, reduction="sum"), xa)
    return out.detach(), g


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--sizes", default="32,64,128,256,512")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    cfg = config_from_dict(rs.load_meta(a.run)["config"])
    model = rs.load(a.run, device="cpu").eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    x, y = load_split(cfg, cfg.eval.split)
    x, y = x[:a.images], y[:a.images]
    sizes = [int(s) for s in a.sizes.split(",")]
    print(machine_line(), f"torch threads {torch.get_num_threads()}, {a.images} images", sep="\n")
    for grad in (True, False):
        for nhwc in (False, True):
            with channels_last_weights(model, nhwc):
                whole = _once(model, x, y, a.images, grad)
                cells = []
                for size in sizes:
                    got = _once(model, x, y, size, grad)  # warm-up, and the exactness check
                    exact = torch.equal(got[0], whole[0]) and (not grad or torch.equal(got[1], whole[1]))
                    times = []
                    for _ in range(a.repeats):
                        start = time.perf_counter()
                        _once(model, x, y, size, grad)
                        times.append(time.perf_counter() - start)
                    cells.append(f"{size}: {statistics.median(times) * 1e3:6.1f} ms{'' if exact else ' (not exact)'}")
            kind = "forward + input gradient" if grad else "forward"
            print(f"{kind:24s} {'NHWC' if nhwc else 'NCHW'}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
