"""Command line: a thin layer over the public API. Every user error is one line on stderr and exit status 2.

    robustsparse demo [--data digits|fashion_mnist] [--out DIR] [--quick]   the whole story (grid, AWT, SMART sweep),
                                                       one report; re-run the same command to continue
    robustsparse train CONFIG [k=v ...] --out DIR [--resume]
    robustsparse eval RUN_OR_CKPT [--suite clean,pgd-20,autoattack] [--eps E] [--autoattack-n K] [--json]  (8/255)
    robustsparse eval --model pkg.module:function --weights W.safetensors --data DATASET [--suite ...] [--eps E]
    robustsparse prune CONFIG [k=v ...] --method M --density D --out DIR   (prune --resume --out DIR continues)
    robustsparse compare CONFIG [k=v ...] --methods ... --densities ... --out DIR [--seeds 0,1,2]
    robustsparse posttrain CONFIG [k=v ...] --method {hydra,lwm,imp} --density D --out DIR [--pretrained RUN]
    robustsparse study CONFIG [k=v ...] --out DIR [--seeds 0,1] [--stages ...]   every claim over seeds, one report
    robustsparse sweep RUN [RUN ...] --lams 0,0.1,...,1 [--suite clean,pgd-20] [--out DIR]   λ trade-off
    robustsparse bench [--model M --input-shape C,H,W --batch B --steps K] [--json PATH] [--inference]   speed
    robustsparse export RUN --out DIR [--which best|last] [--format safetensors,onnx]   deployable sparse model
    robustsparse configs                               list the configs shipped with the library
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import UserError
from .bench import add_bench_parser, cmd_bench
from .export import add_export_parser, cmd_export
from .posttrain import add_posttrain_parser, cmd_posttrain
from .study import add_study_parser, cmd_study
from .sweep import add_sweep_parser, cmd_sweep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustsparse", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the whole story: dense PGD-AT, AWT and its baselines, SMART, one report")
    demo.add_argument("--data", choices=tuple(DEMO_CONFIGS), default="digits",
                      help="digits (default, minutes: the shipped digits_pgdat) or fashion_mnist (hours on a CPU: "
                           "fmnist_pgdat, clean + PGD-20 on the 10,000 test points, AutoAttack on the first 1,000)")
    demo.add_argument("--out", default=None,
                      help="demo folder (default: runs/demo, runs/demo-fashion_mnist); re-run the same command to "
                           "continue it")
    demo.add_argument("--density", type=float, default=0.05, help="density of the tickets (default 0.05)")
    demo.add_argument("--quick", action="store_true", help="skip the full AutoAttack of the headline models")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=5")

    train = sub.add_parser("train", help="train a model from a YAML config (a path or a shipped config name)")
    train.add_argument("config", nargs="?", help="YAML file or shipped config name (optional with --resume)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=5")
    train.add_argument("--out", required=True, help="run folder; must not exist yet unless --resume")
    train.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    train.add_argument("--ticket", default=None, help="start from a `robustsparse prune` output (mask + weights)")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bars (the one-line summary of each epoch is still printed)")

    prune = sub.add_parser("prune", help="find a sparse ticket at initialisation (mask + initial weights)")
    prune.add_argument("config", nargs="?", help="YAML file or shipped config name (optional with --resume)")
    prune.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. prune.search_iters=50")
    prune.add_argument("--resume", action="store_true", help="continue the killed prune run in --out (ntt/awt)")
    prune.add_argument("--method", default=None, help="random, magnitude, snip, grasp, synflow, ntt or awt")
    prune.add_argument("--density", type=float, default=None, help="kept fraction of conv/linear weights")
    prune.add_argument("--out", required=True, help="ticket folder; must not exist yet")
    prune.add_argument("--no-progress", action="store_true", help="no progress bar for the ntt/awt search")

    cmp_ = sub.add_parser("compare", help="grid: dense + methods x densities, trained alike, one table and plot")
    cmp_.add_argument("config", help="YAML file or shipped config name")
    cmp_.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    cmp_.add_argument("--methods", default="random,magnitude,snip,grasp,synflow,ntt,awt")
    cmp_.add_argument("--densities", default="0.1,0.05")
    cmp_.add_argument("--suite", default=None, help="evaluation suite (default: the config's eval.suite)")
    cmp_.add_argument("--out", required=True, help="grid folder; an interrupted grid continues when re-run")
    cmp_.add_argument("--dynamics", action="store_true",
                      help="record NTK/output dynamics on a fixed adversarial probe each epoch; plot dynamics.png")
    cmp_.add_argument("--seeds", default=None,
                      help="comma-separated seeds: the grid once per seed in OUT/seed<s>/, then mean ± std in OUT")
    cmp_.add_argument("--no-progress", action="store_true", help="no progress bars")

    _add_eval_parser(sub)
    sub.add_parser("configs", help="list the configs shipped with the library")
    add_posttrain_parser(sub)
    add_sweep_parser(sub)
    add_study_parser(sub)
    add_bench_parser(sub)
    add_export_parser(sub)
    return p


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a run folder or checkpoint (or, with --model/--weights/--data, a model "
                                     "built elsewhere) with the one evaluator")
    ev.add_argument("path", nargs="?", default=None, help="run folder, checkpoint .json or .safetensors")
    ev.add_argument("--model", default=None, metavar="PKG.MODULE:FUNCTION",
                    help="a model built elsewhere: FUNCTION() returns the nn.Module ([0, 1] images -> logits; "
                         "normalisation inside it)")
    ev.add_argument("--weights", default=None, help="with --model: its weights, a safetensors file (never a pickle)")
    ev.add_argument("--data", default=None, help="with --model: the dataset name (see robustsparse.list_datasets)")
    ev.add_argument("--suite", default=None, help="comma-separated attacks (default: the run's eval.suite; with "
                                                  "--model: clean,pgd-20,autoattack)")
    ev.add_argument("--eps", default=None,
                    help="perturbation budget, a number or a fraction such as 8/255 (default: the run's eval/attack "
                         "eps; with --model: 8/255)")
    ev.add_argument("--norm", choices=("Linf", "L2"), default=None, help="threat model (default: the run's)")
    ev.add_argument("--split", default=None, help="dataset split (default: the run's eval.split, normally test)")
    ev.add_argument("--n", default=None,
                    help="evaluate only the first N images of the split (default: the run's eval.n; all: every one)")
    ev.add_argument("--autoattack-n", default=None, metavar="K",
                    help="run AutoAttack (and its components) on the first K of those images only, the other "
                         "attacks on all (default: the run's eval.autoattack_n; all: the same images)")
    ev.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint of a run folder")
    ev.add_argument("--data-root", default=None, help="folder of on-disk data (default: the run's data.root)")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--state", default=None, help="resumable evaluation state file (JSON)")
    ev.add_argument("--lam", type=float, default=None, help="once-for-all runs: the trade-off λ in [0, 1]")
    ev.add_argument("--mix", choices=("switch", "weight", "logit"), default=None, help="SMART: λ at inference")
    ev.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")


def _version() -> str:
    from .._version import __version__
    return f"robustsparse {__version__}"


def cmd_train(args) -> int:
    from ..config import load_config
    from ..train import train

    cfg = None
    if args.config is not None and "=" in args.config and not os.path.exists(args.config):
        args.overrides.insert(0, args.config)  # `train k=v --resume`: the first override landed in CONFIG
        args.config = None
    if args.config is not None or not args.resume:
        if args.config is None:
            raise UserError("train needs a CONFIG (a YAML path or a shipped name; see `robustsparse configs`)")
        cfg = load_config(args.config, args.overrides + ([f"train.ticket={args.ticket}"] if args.ticket else []))
    elif args.overrides or args.ticket:
        raise UserError("--resume continues the run with its own config; overrides are not accepted")
    result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks for the run
        return 0
    best = "n/a (no validation split)" if result.best_val_robust is None else f"{result.best_val_robust:.2%}"
    print(f"finished: {result.run_dir} (best validation score {best}); "
          f"evaluate with: robustsparse eval {result.run_dir}")
    return 0


def cmd_eval(args) -> int:
    from ..api import evaluate_run  # deferred: `robustsparse configs` and --help stay fast (no torch import)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.eps is not None:
        from ..eval import parse_eps
        args.eps = parse_eps(args.eps)  # "8/255" or a number; a bad one is a one-line UserError
    if args.model is not None or args.weights is not None or args.data is not None:
        from ..eval.external import evaluate_cli_args  # a model built elsewhere (eval/external.py)
        result, label = evaluate_cli_args(args), f"{args.model} with {args.weights} on {args.data}"
    elif args.path is None:
        raise UserError("eval needs a RUN (folder or checkpoint), or --model, --weights and --data")
    else:
        result, _ = evaluate_run(args.path, args.suite, args.eps, args.norm, args.split, args.n, args.which,
                                 args.data_root, args.batch_size, args.seed, args.state,
                                 progress=not args.no_progress, lam=args.lam, mix=args.mix,
                                 autoattack_n=args.autoattack_n)
        label = args.path
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(f"{label}: {result.n:,} images")
        print(result.table())
        for w in result.warnings:
            print(f"warning: {w}", file=sys.stderr)
    return 0


# the demo's data -> (shipped config, default folder); a fixed folder, so that re-running the command continues it
DEMO_CONFIGS = {"digits": ("digits_pgdat", os.path.join("runs", "demo")),
                "fashion_mnist": ("fmnist_pgdat", os.path.join("runs", "demo-fashion_mnist"))}


def cmd_demo(args) -> int:
    from ..config import load_config
    from ..pipelines.demo import run_story

    config_name, default_out = DEMO_CONFIGS[args.data]
    out = args.out or default_out
    cfg = load_config(config_name, args.overrides)
    print(f"demo: {args.data} ({config_name}), eps={cfg.attack.eps}, folder {out} (re-run the same command to "
          "continue)", file=sys.stderr)
    report = run_story(cfg, out, density=args.density, final_suite=None if args.quick else cfg.eval.suite,
                       progress=not args.no_progress, config_name=config_name)
    with open(report) as fh:
        print(fh.read())
    print(f"report: {report}")
    return 0


def _with_flags(overrides, **flags):
    return list(overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]


def cmd_prune(args) -> int:
    from ..config import load_config
    from ..pipelines.ticket import prune_to_folder

    overrides = _with_flags(args.overrides, **{"prune.method": args.method, "prune.density": args.density})
    if args.config is None and not args.resume:
        raise UserError("prune needs a CONFIG (a YAML file or a shipped config name), or --resume")
    cfg = load_config(args.config, overrides) if args.config is not None else None
    if cfg is None and overrides:
        raise UserError("overrides need a CONFIG; to resume, give only --resume --out DIR")
    ticket = prune_to_folder(cfg, args.out, progress=not args.no_progress, resume=args.resume)
    cfg = load_config(os.path.join(args.out, "config.yaml"))
    print(f"ticket: {args.out} ({cfg.prune.method}, density {ticket.mask.density():.4f}, "
          f"{ticket.info['seconds']:.1f} s); train it with: robustsparse train {args.config or 'CONFIG'} "
          f"--ticket {args.out} --out RUN")
    return 0


def cmd_compare(args) -> int:
    from ..pipelines.compare import run_compare, run_compare_seeds
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        densities = [float(d) for d in args.densities.split(",") if d.strip()]
    except ValueError as exc:
        raise UserError(f"--densities must be comma-separated numbers, got {args.densities!r}") from exc
    if args.seeds is None:
        run_compare(cfg, methods, densities, args.out, suite=args.suite, progress=not args.no_progress,
                    dynamics=args.dynamics)
    else:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError as exc:
            raise UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from exc
        run_compare_seeds(cfg, methods, densities, args.out, seeds, suite=args.suite,
                          progress=not args.no_progress, dynamics=args.dynamics)
    with open(os.path.join(args.out, "results.md")) as fh:
        print(fh.read())
    return 0


def cmd_configs(args) -> int:
    from ..configs import shipped_descriptions
    rows = shipped_descriptions()
    width = max((len(name) for name, _ in rows), default=0)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`train CONFIG --out DIR k=v`): argparse leaves those over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from ..utils.threads import configure_threads
    configure_threads()  # no more torch threads than the cores this process may use (threads.py)
    handler = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "configs": cmd_configs,
               "prune": cmd_prune, "compare": cmd_compare, "posttrain": cmd_posttrain, "sweep": cmd_sweep,
               "study": cmd_study,
               "bench": cmd_bench, "export": cmd_export}[args.command]
    try:
        return handler(args)
    except UserError as exc:
        print(f"robustsparse: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("robustsparse: interrupted; a training run continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
