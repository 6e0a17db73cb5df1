"""``robustsparse export RUN --out DIR``: a deployable model whose inference skips the mask's zeros.

    robustsparse export runs/digits --out exports/digits [--which best|last] [--format safetensors,onnx]
                        [--batches 1,256] [--choose time|rule] [--lam L [--mix M]]

Everything is checked (the run loads, --out is new, formats and batch sizes parse) before the folder is made;
the export itself is built under a temporary name and renamed when its equality check has passed.
"""
from __future__ import annotations


def add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="write a deployable sparse model (safetensors + loader; ONNX if installed)")
    ex.add_argument("run", help="run folder, checkpoint .json or .safetensors")
    ex.add_argument("--out", required=True, help="export folder; must not exist yet")
    ex.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint of a run folder")
    ex.add_argument("--format", default="safetensors",
                    help="comma-separated: safetensors (always written), onnx (needs robustsparse[deploy]: onnx "
                         "and onnxruntime; checked in ONNX Runtime)")
    ex.add_argument("--lam", type=float, default=None, help="once-for-all runs: the trade-off λ in [0, 1] to export")
    ex.add_argument("--mix", choices=("switch", "weight", "logit"), default=None, help="SMART: λ at inference")
    ex.add_argument("--batches", default="1,256",
                    help="batch sizes the per-layer kernels are timed and chosen at (default 1,256)")
    ex.add_argument("--choose", choices=("time", "rule"), default="time",
                    help="kernel choice: measured per layer (default) or the density rule (no timing)")
    ex.add_argument("--tolerance", type=float, default=1e-4,
                    help="largest accepted max |logit difference| to the masked model (default 1e-4)")
    ex.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_export(args) -> int:
    import math

    from ..errors import UserError
    from ..export import export_run

    if not (isinstance(args.tolerance, float) and math.isfinite(args.tolerance) and args.tolerance > 0):
        raise UserError(f"--tolerance must be a positive number, got {args.tolerance}")
    meta = export_run(args.run, args.out, which=args.which, lam=args.lam, mix=args.mix, formats=args.format,
                      batches=args.batches, choose=args.choose, tol=args.tolerance, progress=not args.no_progress)
    eq = meta["equality"]["max_abs_logit_diff"]
    p = meta["params"]
    kernels = sorted({k for layer in meta["layers"] for k in layer["kernel"].values()})
    print(f"export: {args.out} (layer weights {p['layer_weights_compact']:,} of {p['layer_weights_original']:,} "
          f"kept after channel compaction, {p['layer_weights_nonzero']:,} non-zero; kernels used: "
          f"{', '.join(kernels)}; max |logit diff| {max(eq.values()):.1e} at batch sizes {', '.join(eq)})")
    if "onnx" in meta:
        o = meta["onnx"]
        print(f"onnx: {args.out}/{o['file']} (opset {o['opset']}, dynamic batch; {o['equality']['runtime']}: max "
              f"|logit diff| {max(o['equality']['max_abs_logit_diff'].values()):.1e}); run it with "
              f"robustsparse.export.run_onnx({args.out!r}, images)")
    print(f"load it with robustsparse.export.load_exported({args.out!r}), or standalone: "
          f"import sys; sys.path.insert(0, {args.out!r}); from load_sparse import load; model = load({args.out!r})")
    return 0
