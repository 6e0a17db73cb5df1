"""``robustsparse sweep``: the λ trade-off of once-for-all runs (and plain reference runs) with the one evaluator.

    robustsparse sweep RUN [RUN ...] [--lams 0,0.1,...,1 | 0:1:0.1] [--suite clean,pgd-20] [--mix weight] --out DIR
"""
from __future__ import annotations

import os


def add_sweep_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="evaluate once-for-all runs over λ (plain runs once); trade-off plot + tables")
    sw.add_argument("runs", nargs="+", metavar="RUN", help="run folders (once-for-all and plain reference runs)")
    sw.add_argument("--lams", default="0:1:0.1", help="λ values: comma-separated, or a:b:step (default 0:1:0.1)")
    sw.add_argument("--suite", default="clean,pgd-20", help="attacks, e.g. clean,pgd-20,autoattack")
    sw.add_argument("--mix", choices=("switch", "weight", "logit"), default=None,
                    help="SMART λ at inference (default: each run's ofa.mix)")
    sw.add_argument("--out", default=None, help="output folder (default: <first RUN>/sweep); re-run to resume/add")
    sw.add_argument("--eps", type=float, default=None, help="perturbation budget (default: the runs' own)")
    sw.add_argument("--n", default=None,
                    help="evaluate only the first N images of the split (default: the first run's eval.n; all)")
    sw.add_argument("--autoattack-n", default=None, metavar="K",
                    help="AutoAttack on the first K of those images only (default: the first run's "
                         "eval.autoattack_n; all: the same images)")
    sw.add_argument("--split", default=None, help="dataset split (default: the first run's eval.split)")
    sw.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint of each run")
    sw.add_argument("--batch-size", type=int, default=None)
    sw.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_sweep(args) -> int:
    from ..pipelines.sweep import sweep
    out = args.out or os.path.join(args.runs[0], "sweep")
    sweep(args.runs, args.lams, args.suite, out, mix=args.mix, eps=args.eps, n=args.n, which=args.which,
          split=args.split, batch_size=args.batch_size, progress=not args.no_progress,
          autoattack_n=args.autoattack_n)
    with open(os.path.join(out, "sweep.md")) as fh:
        print(fh.read())
    print(f"plot: {os.path.join(out, 'tradeoff.png')}")
    return 0
