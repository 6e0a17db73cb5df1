"""Where one PGD-AT training step of the trainer spends its time, by operator (torch.profiler, CPU).

    python scripts/profile_step.py [--model smallcnn --input-shape 1,28,28 --batch 128 --steps 10 --amp bf16
                                    --channels-last --iters 3 --rows 20]

It runs `robustsparse bench`'s copy of the trainer's loop (pipelines/bench.py OurLoop: the same engine step, seeded
batches and objective) on random data, warms up one step, profiles ``--iters`` steps and prints the operators
sorted by their own CPU time, plus the share of the step the convolutions (forward and backward) take. It names
what limits a step when a speed target is missed (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import robustsparse as rs
from robustsparse.config import parse_model_options
from robustsparse.pipelines.bench import OurLoop, parse_input_shape
from robustsparse.train.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--model-option", action="append", default=[])
    p.add_argument("--input-shape", default="1,28,28")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--amp", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rows", type=int, default=20)
    a = p.parse_args()
    shape = parse_input_shape(a.input_shape)
    torch.manual_seed(0)
    model = rs.build_model(a.model, shape[0], 10, shape[1:], **parse_model_options(a.model_option))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand((a.batch * (a.iters + 1), *shape), generator=g), torch.randint(0, 10, (a.batch * (a.iters + 1),))
    engine = Engine.create(torch.device("cpu"), amp=a.amp, channels_last=a.channels_last)
    loop = OurLoop(model, x, y, a.batch, a.steps, engine)
    loop.run(1)  # warm-up: oneDNN primitive creation, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loop.run(a.iters)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key or "conv" in e.key.split("::")[-1])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    print(f"{a.model} {a.input_shape} batch {a.batch} PGD-{a.steps} amp={a.amp} channels_last={a.channels_last}, "
          f"{torch.get_num_threads()} thread(s): {total / 1e6 / a.iters:.2f} s of operator self-time per step, "
          f"{conv / total:.0%} of it in convolution operators (forward and backward)")


if __name__ == "__main__":
    main()
