"""What the evaluator's CPU execution (NHWC weights, micro-batches) buys, attack by attack, and whether it changes a
single flag.

    python scripts/bench_eval.py RUN [--n 200] [--items clean,pgd-20,apgd-ce,apgd-t,fab-t,square] [--json OUT]

For each item it runs the one evaluator (`robustsparse.evaluate`, the run's ε, norm and seed 0, the run's
`eval.batch_size`) on the first ``--n`` test points of the run's dataset twice: the plain path (NCHW, each chunk
in one forward: ``channels_last=False, micro_batch=0``) and the default one (on CPU: NHWC weights and the model
run a few dozen images at a time inside each chunk; docs/benchmarks.md "Evaluator"). The order alternates from
item to item so that load drifting during the run favours neither. It prints the seconds of each, the speed-up,
the accuracy of each and the number of points whose robust flag differs (the parity check: the same attack,
steps, restarts, targets and queries, the same chunks and random draws, in fp32; only each convolution's
summation order can differ). An AutoAttack component named alone runs on every clean-correct point, as the
cascade's first component does; later components of the cascade see fewer points, so the cascade costs less than
the sum.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import robustsparse as rs
from robustsparse.config import config_from_dict
from robustsparse.data.registry import load_split
from robustsparse.runs.machine import machine_line


PLAIN = {"channels_last": False, "micro_batch": 0}


def run_item(model, x, y, item, eps, norm, classes, batch_size, plain):
    """Seconds, accuracy and per-point flags of one item in one layout; the flags are read from the evaluation's
    own resumable state file (it records them), written to a temporary path and removed."""
    path = f"/tmp/bench_eval-{os.getpid()}-{item}-{int(plain)}.json"
    start = time.perf_counter()
    result = rs.evaluate(model, x, y, suite=item, eps=eps, norm=norm, num_classes=classes, batch_size=batch_size,
                         seed=0, progress=False, run_checks=False, state_path=path, **(PLAIN if plain else {}))
    seconds = time.perf_counter() - start
    with open(path) as fh:
        flags = json.load(fh)["flags"][item]
    os.remove(path)
    return seconds, result.accuracy[item], flags, f"{result.layout}, micro-batch {result.micro_batch}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--items", default="clean,pgd-20,apgd-ce,apgd-t,fab-t,square")
    p.add_argument("--json")
    a = p.parse_args()
    meta = rs.load_meta(a.run)
    cfg = config_from_dict(meta["config"])
    model = rs.load(a.run, device="cpu")
    x, y = load_split(cfg, cfg.eval.split)
    x, y = x[:a.n], y[:a.n]
    eps = cfg.eval.eps if cfg.eval.eps is not None else cfg.attack.eps
    classes = meta["model_spec"]["num_classes"]
    rows = []
    print(machine_line(), f"torch threads {torch.get_num_threads()}", sep="\n")
    for i, item in enumerate(s.strip() for s in a.items.split(",")):
        order = (True, False) if i % 2 == 0 else (False, True)
        got = {plain: run_item(model, x, y, item, eps, cfg.attack.norm, classes, cfg.eval.batch_size, plain)
               for plain in order}
        (t0, acc0, f0, how0), (t1, acc1, f1, how1) = got[True], got[False]
        differ = sum(a_ != b_ for a_, b_ in zip(f0, f1))
        rows.append({"item": item, "points": len(f0), "plain_s": t0, "default_s": t1, "speedup": t0 / t1,
                     "plain_acc": acc0, "default_acc": acc1, "flags_differ": differ, "plain": how0,
                     "default": how1})
        print(f"{item:8s} {len(f0):5d} points  plain {t0:8.1f} s  default ({how1}) {t1:8.1f} s  {t0 / t1:5.2f}x  "
              f"acc {acc0:.2%} / {acc1:.2%}  flags differ: {differ}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"run": a.run, "n": a.n, "machine": machine_line(), "threads": torch.get_num_threads(),
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
