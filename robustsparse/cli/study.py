"""``robustsparse study``: every claim of one config measured over seeds, resumable, one report (study.md).

    robustsparse study fmnist_pgdat --out runs/fmnist-study [--seeds 0,1] [--stages atinit,autoattack,posttrain,ofa]
"""
from __future__ import annotations

from ..errors import UserError


def add_study_parser(sub) -> None:
    st = sub.add_parser("study", help="the benchmark study over seeds: at-init grid, AutoAttack of the key models, "
                                      "HYDRA/LWM, the once-for-all sweep; one report, resumable")
    st.add_argument("config", help="YAML file or shipped config name (e.g. fmnist_pgdat)")
    st.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    st.add_argument("--out", required=True, help="study folder; re-run the same command to continue it")
    st.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    st.add_argument("--densities", default="0.1,0.05",
                    help="at-init densities (default 0.1,0.05); HYDRA/LWM run at the first")
    st.add_argument("--methods", default=None, help="at-init methods (default: every one the demo runs)")
    st.add_argument("--stages", default="atinit,autoattack,posttrain,ofa",
                    help="subset of atinit,autoattack,posttrain,ofa (in that order; later stages need atinit)")
    st.add_argument("--posttrain-epochs", type=int, default=None, metavar="N",
                    help="HYDRA's score epochs and HYDRA/LWM's fine-tune epochs (default: the config's "
                         "prune.hydra_epochs and prune.finetune_epochs)")
    st.add_argument("--lams", default="0:1:0.1", help="λ values of the once-for-all sweep (default 0:1:0.1)")
    st.add_argument("--no-progress", action="store_true", help="no progress bars")


def _list(text: str, kind, name: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"--{name} must be comma-separated values, got {text!r}") from exc


def cmd_study(args) -> int:
    from ..config import load_config
    from ..pipelines.demo import METHODS
    from ..pipelines.study import run_study

    cfg = load_config(args.config, args.overrides)
    methods = _list(args.methods, str, "methods") if args.methods else list(METHODS)
    path = run_study(cfg, args.out, _list(args.seeds, int, "seeds"), methods, _list(args.densities, float, "densities"),
                     [s.strip() for s in args.stages.split(",") if s.strip()], lams=args.lams,
                     posttrain_epochs=args.posttrain_epochs,
                     progress=not args.no_progress, config_name=args.config)
    with open(path) as fh:
        print(fh.read())
    return 0
