"""Check the evaluator against an independent torchattacks run on the same model, data and epsilon.

    python scripts/parity_torchattacks.py RUN_OR_CKPT [--n N] [--eps E]

Ours: rs.evaluate with suite clean,pgd-20,autoattack (the AutoAttack cascade over still-robust points).
Independent: torchattacks.PGD (20 steps, alpha = eps/4, random start) and each standard AutoAttack component at full
budget (APGD-CE 100, APGD-T 100 x 9 targets, FAB-T 100 x 9 targets, Square 5000) run on every clean-correct point,
with the pointwise worst case taken over them. Prints both and their differences in percentage points.
"""
import argparse
import json
import time

import torch
import torchattacks

import robustsparse as rs
from robustsparse.api import evaluate_run


def independent(model, x, y, eps, num_classes, batch=500):
    model.eval()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    n_cls = num_classes
    components = {
        "pgd-20": torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=20, random_start=True),
        "apgd-ce": torchattacks.APGD(model, eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        "apgd-t": torchattacks.APGDT(model, eps=eps, steps=100, n_restarts=1, seed=0, n_classes=n_cls),
        "fab-t": torchattacks.FAB(model, eps=eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=n_cls,
                                  seed=0),
        "square": torchattacks.Square(model, eps=eps, n_queries=5000, n_restarts=1, p_init=0.8, seed=0),
    }
    robust = {}
    for name, atk in components.items():
        ok = clean.clone()
        for i in range(0, len(y), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            x_adv = (xb + (atk(xb, yb) - xb).clamp(-eps, eps)).clamp(0, 1)
            with torch.no_grad():
                ok[i:i + batch] &= model(x_adv).argmax(1) == yb
        robust[name] = ok
    aa = robust["apgd-ce"] & robust["apgd-t"] & robust["fab-t"] & robust["square"]
    return {"clean": clean.float().mean().item(), "pgd-20": robust["pgd-20"].float().mean().item(),
            "autoattack": aa.float().mean().item()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--eps", type=float, default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    ours, cfg = evaluate_run(args.path, suite="clean,pgd-20,autoattack", eps=args.eps, n=args.n, progress=False)
    t1 = time.perf_counter()
    meta = rs.load_meta(args.path)
    from robustsparse.data import load_split
    x, y = load_split(cfg, cfg.eval.split)
    if args.n:
        x, y = x[:args.n], y[:args.n]
    theirs = independent(rs.load(args.path), x, y, ours.eps, meta["model_spec"]["num_classes"])
    t2 = time.perf_counter()
    rows = {k: {"ours": ours.accuracy[k], "torchattacks": theirs[k],
                "diff_points": 100 * (ours.accuracy[k] - theirs[k])} for k in ("clean", "pgd-20", "autoattack")}
    print(json.dumps({"n": ours.n, "eps": ours.eps, "rows": rows, "attacks": ours.attacks,
                      "seconds": {"ours": t1 - t0, "torchattacks": t2 - t1}}, indent=1))


if __name__ == "__main__":
    main()
