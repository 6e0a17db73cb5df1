"""``robustsparse posttrain``: the after-training pruning pipelines (HYDRA, LWM, adversarial IMP) as one command.

    robustsparse posttrain CONFIG [k=v ...] --method {hydra,lwm,imp} --density D --out DIR [--pretrained RUN]
    robustsparse posttrain --resume --out DIR

A thin layer over ``robustsparse.posttrain`` (the run-folder layout is in its docstring).
"""
from __future__ import annotations

import os

from ..errors import UserError


def add_posttrain_parser(sub) -> None:
    p = sub.add_parser("posttrain", help="after-training pruning: dense robust pre-training -> prune -> fine-tune "
                                         "(hydra, lwm, imp)")
    p.add_argument("config", nargs="?", help="YAML file or shipped config name (optional with --resume)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. prune.hydra_epochs=20")
    p.add_argument("--method", default=None, help="hydra, lwm or imp (default: the config's prune.method)")
    p.add_argument("--density", default=None,
                   help="kept fraction of conv/linear weights; imp also takes a list (0.1,0.05): one chain")
    p.add_argument("--out", required=True, help="pipeline folder; running the same command again continues it")
    p.add_argument("--pretrained", default=None, help="reuse this finished dense run (read only) as pre-training")
    p.add_argument("--suite", default=None,
                   help="final evaluation (default: the config's eval.suite; 'none' skips it)")
    p.add_argument("--resume", action="store_true", help="continue the pipeline in --out with its own settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parse_density(text: str | None):
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"--density must be a number or comma-separated numbers, got {text!r}") from exc
    if not values:
        raise UserError(f"--density must be a number or comma-separated numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


def cmd_posttrain(args) -> int:
    from ..config import load_config
    from ..posttrain import posttrain
    from ..runs.costs import group_rounds, total_cost

    if args.config is not None and "=" in args.config and not os.path.exists(args.config):
        args.overrides.insert(0, args.config)  # `posttrain k=v --resume`: the first override landed in CONFIG
        args.config = None
    cfg = None
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    elif not args.resume:
        raise UserError("posttrain needs a CONFIG (a YAML path or a shipped name), or --resume --out DIR")
    elif args.overrides or args.method or args.density or args.pretrained or args.suite:
        raise UserError("--resume continues the pipeline with its own settings; give only --resume --out DIR")
    result = posttrain(cfg, args.out, method=args.method, density=_parse_density(args.density),
                       pretrained=args.pretrained, suite=args.suite, resume=args.resume,
                       progress=not args.no_progress)
    for o in result.outcomes:
        total = total_cost(o.stages)
        stages = " + ".join(f"{s['stage']} {s.get('epochs_text') or s['epochs']} ep {s['seconds']:.0f} s"
                            for s in group_rounds(o.stages))
        print(f"{result.method} at density {o.density:g}: {o.run_dir}")
        print(f"  training cost: {stages} = {total['epochs']} epochs, {total['seconds']:.0f} s")
        ev = result.evals.get(o.density)
        if ev is not None:
            from ..eval.evaluator import column_label
            for key, acc in ev["accuracy"].items():
                print(f"  {column_label(ev, key)}: {acc:.2%}")
    print(f"pipeline folder: {result.out} (cost.json, and rounds.jsonl for imp)")
    return 0
