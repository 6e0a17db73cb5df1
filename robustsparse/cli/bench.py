"""``robustsparse bench``: speed of one PGD-k training step, ours against a plain PyTorch loop (`robustsparse.bench`);
with ``--inference``, dense against exported sparse inference (`robustsparse.export`).

    robustsparse bench --model cnn --input-shape 1,8,8 --batch 64 --steps 10 [--device cpu] [--json PATH]
    robustsparse bench --model resnet18 --input-shape 3,32,32 --batch 32 --steps 2 --iters 3 --repeats 3

CPU threads: torch uses one thread per physical core unless told otherwise (``--threads N``, or
``OMP_NUM_THREADS``). Where other processes share the cores, start with ``OMP_WAIT_POLICY=PASSIVE`` in the
environment: OpenMP's default busy-waiting threads then fight the other processes for the cores and torch can be
10-35x slower. That variable is read when torch loads, so it must be set before the process starts; the bench
reports the threads and the policy it ran with.
"""
from __future__ import annotations

import os

from ..errors import UserError


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="images/s of one PGD-k training step: ours vs a plain PyTorch loop "
                                     "(--inference: dense vs exported sparse model)")
    b.add_argument("--model", default=None, help="registered model name (default cnn; --inference: resnet18)")
    b.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="architecture option, e.g. width=64")
    b.add_argument("--input-shape", default=None, help="C,H,W of one image (default 1,8,8: digits; --inference: "
                                                       "3,32,32)")
    b.add_argument("--num-classes", type=int, default=None, help="default 10")
    b.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    b.add_argument("--steps", type=int, default=10, help="attack steps k of PGD-k (default 10)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--iters", type=int, default=10, help="training steps per timed block (default 10)")
    b.add_argument("--warmup", type=int, default=None, help="untimed steps of each loop first (default 2)")
    b.add_argument("--repeats", type=int, default=None, help="timed blocks of each loop, interleaved; the median "
                                                             "is reported (default 5)")
    b.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="ours: autocast precision (auto: bf16 on CUDA and on CPUs with native bf16, else fp32)")
    b.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="ours: NHWC memory format (default: on for CUDA only)")
    b.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    b.add_argument("--compile", action="store_true", help="ours: torch.compile the model")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    b.add_argument("--density", type=float, default=None,
                   help="a sparse model: magnitude mask of this density (both loops carry it; with --inference, "
                        "the density of the exported model)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    b.add_argument("--inference", action="store_true",
                   help="measure inference latency of the dense vs the exported sparse model instead")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    try:  # --run, --structure, --mask, ... (only --inference reads them)
        from ..export.bench import add_inference_arguments
    except ImportError:  # the training benchmark does not need the export package
        return
    add_inference_arguments(b)


def cmd_bench(args) -> int:
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UserError(f"--json {args.json}: folder {os.path.dirname(os.path.abspath(args.json))} does not exist")
    if args.inference:
        try:
            from ..export import bench_inference
        except ImportError as exc:
            raise UserError(f"export not available ({exc}); `bench --inference` needs robustsparse.export") from exc
        return bench_inference(args) or 0
    from ..pipelines.bench import bench_command
    return bench_command(args)
