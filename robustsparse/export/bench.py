"""``robustsparse bench --inference``: CPU latency of the masked dense model vs its sparse export, same run.

Three models, and ONNX Runtime's when it is installed, timed interleaved (one call of each per round, so machine
load drifts hit all alike):

* ``dense``: the masked model as trained, weights w·m (zeros included), the mask hooks removed so that the
  per-forward re-multiplication by the mask is not charged to it; PyTorch eval mode, NCHW.
* ``folded``: the export runtime with batch norm folded but no sparsity used (every channel, dense kernels): it
  separates what BN folding buys from what the sparsity buys.
* ``exported``: the export (`compile_model`, kernels chosen by timing at these batch sizes).
* ``onnxruntime``: the ``--format onnx`` file of the same model (dense-equivalent graph, checked within 1e-4 of
  ``dense``) in an ONNX Runtime CPU session with as many intra-op threads as torch uses; without onnxruntime (the
  ``deploy`` extra) the row is left out and the result says why.

Latency = median over ``repeats`` rounds after ``warmup`` calls, per batch size; speed-up = dense / exported.
Output equality: max |Δlogit| between dense and exported on the same seeded uniform [0, 1] images.

The model is a run folder (``--run``, its ``--which`` checkpoint), or built here from a spec: ``--model`` at
``--input-shape`` (C,H,W; defaults resnet18 at 3,32,32) with a mask at ``--density`` of ``--structure`` (unstructured | channel | N:M) scored by
``--mask`` (``random``: uniform scores; ``magnitude``: |θ₀|, the default) in ``--scope``; ``--inference-batches``
(default 1,256), ``--repeats`` (default 7), ``--warmup`` (2), ``--threads``, ``--json PATH``. A built model has not been trained,
so its BN running statistics are set, after masking, from 4 batches of uniform noise (train-mode passes, cumulative
average) to give the layers the activation scales of a used network, and its BN affine parameters are drawn as
γ ~ U(0.5, 1.5), β ~ N(0, 0.1²), as a trained network's are not (1, 0) (a pruned filter's channel then carries
the constant β, which the export must fold into the next layer, padding included); the conv weights are θ₀·m.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

from ..config import parse_model_options
from ..errors import UserError
from ..runs.atomic import write_json_atomic
from .export import compile_model, input_shape_of, parse_batches
from .lower import effective_copy

DEFAULTS = dict(run=None, which="best", model="resnet18", model_option=None, input_shape="3x32x32", num_classes=10,
                density=0.1, structure="unstructured", mask="magnitude", scope=None, seed=0,
                inference_batches="1,256", repeats=7, warmup=2, threads=None, choose="time", json=None)
# The `bench` subparser (cli/bench.py) is shared with the training benchmark; older spellings are accepted too.
_ALIASES = {"input_shape": ("input",), "num_classes": ("classes",), "inference_batches": ("batches",)}


def add_inference_arguments(parser) -> None:
    """The options only ``bench --inference`` uses (the shared ones, --model, --input-shape, --num-classes,
    --density, --repeats, --warmup, --threads, --json, are the training benchmark's)."""
    g = parser.add_argument_group("inference (--inference)")
    g.add_argument("--run", default=None, help="a run folder or checkpoint to export and time (instead of --model)")
    g.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint of --run")
    g.add_argument("--structure", default="unstructured",
                   help="mask of a --model: unstructured, channel or N:M such as 2:4 (default unstructured)")
    g.add_argument("--mask", choices=("random", "magnitude"), default="magnitude",
                   help="scores of a --model's mask: uniform random or |θ₀| (default magnitude)")
    g.add_argument("--scope", choices=("global", "layer"), default=None,
                   help="mask scope (default: layer for channel, global otherwise)")
    g.add_argument("--inference-batches", default="1,256", help="batch sizes to time (default 1,256)")
    g.add_argument("--choose", choices=("time", "rule"), default="time",
                   help="per-layer kernel choice: measured (default) or the density rule")


def _options(args) -> SimpleNamespace:
    """Read the options from an argparse Namespace (a missing or None one takes its default)."""
    opts = {}
    for key, default in DEFAULTS.items():
        value = getattr(args, key, None)
        for alias in _ALIASES.get(key, ()):
            value = getattr(args, alias, None) if value is None else value
        opts[key] = default if value is None else value
    return SimpleNamespace(**opts)


def _parse_shape(text) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in (text.lower().replace(",", "x").split("x") if isinstance(text, str) else text)]
    except (TypeError, ValueError, AttributeError):
        parts = []
    if len(parts) != 3 or min(parts) < 1:
        raise UserError(f"--input-shape must be C,H,W (e.g. 3,32,32), got {text!r}")
    return tuple(parts)


def _calibrate_bn(model: torch.nn.Module, shape, seed: int) -> None:
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    gen = torch.Generator().manual_seed(seed + 1)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        if m.affine:  # trained BN affines are not (1, 0); a pruned channel's constant output is then β, not 0
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand((32, *shape), generator=gen))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def build_masked_model(model: str = "resnet18", input_shape=(3, 32, 32), num_classes: int = 10,
                       density: float = 0.1, structure: str = "unstructured", mask: str = "magnitude",
                       scope: str | None = None, seed: int = 0, options: dict | None = None) -> torch.nn.Module:
    """An untrained ``model`` with a ``structure`` mask at ``density`` (``mask``: random | magnitude scores),
    BN statistics calibrated on uniform noise; eval mode. ``scope`` None: layer for channel, else global."""
    from ..models import build_model
    from ..sparse import apply_mask, prunable_parameters
    from ..sparse.structured import parse_structure, structured_masks

    if mask not in ("random", "magnitude"):
        raise UserError(f"--mask must be random or magnitude, got {mask!r}")
    kind, n, m = parse_structure(structure)
    if kind == "nm":
        density = n / m
    shape = _parse_shape(input_shape)
    torch.manual_seed(seed)
    net = build_model(model, shape[0], num_classes, shape[1:], **(options or {}))
    params = prunable_parameters(net)
    gen = torch.Generator().manual_seed(seed)
    scores = {k: (torch.rand(p.shape, generator=gen) if mask == "random" else p.detach().abs())
              for k, p in params.items()}
    scope = scope or ("layer" if kind == "channel" else "global")
    apply_mask(net, structured_masks(scores, density, scope, 0.01, structure))
    _calibrate_bn(net, shape, seed)  # after masking: the statistics of the sparse network, as training gives
    return net.eval()


def _time_interleaved(models: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    times = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in range(repeats):
            for k, m in models.items():
                start = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def run_inference_bench(opts: SimpleNamespace, progress: bool = True) -> dict:
    """Build or load the model, compile it, time the three models at each batch size; return the result."""
    from ..sparse.mask import get_mask

    batches = parse_batches(opts.inference_batches)
    if opts.threads is not None:
        if int(opts.threads) < 1:
            raise UserError(f"--threads must be >= 1, got {opts.threads}")
        torch.set_num_threads(int(opts.threads))
    for key in ("repeats", "warmup"):
        if int(getattr(opts, key)) < (1 if key == "repeats" else 0):
            raise UserError(f"--{key} must be >= {1 if key == 'repeats' else 0}, got {getattr(opts, key)}")
    if opts.run is not None:
        from ..api import load
        model = load(opts.run, which=opts.which)
        source = {"run": os.path.abspath(opts.run), "which": opts.which}
    else:
        model = build_masked_model(opts.model, opts.input_shape, int(opts.num_classes), float(opts.density),
                                   opts.structure, opts.mask, opts.scope, int(opts.seed),
                                   parse_model_options(opts.model_option))
        source = {"model": opts.model, "input": list(_parse_shape(opts.input_shape)), "density_target": opts.density,
                  "structure": opts.structure, "mask": opts.mask,
                  "scope": opts.scope or ("layer" if opts.structure == "channel" else "global"),
                  "seed": opts.seed, "bn": "untrained: gamma~U(0.5,1.5), beta~N(0,0.01), running statistics from 4 "
                                          "batches of uniform noise after masking"}
    shape = input_shape_of(model)
    mask = get_mask(model)
    compiled = compile_model(model, shape, batches, opts.choose, repeats=5, progress=progress)
    folded = compile_model(model, shape, batches, "dense", progress=False)
    models = {"dense": effective_copy(model), "folded": folded.model(), "exported": compiled.model()}
    with tempfile.TemporaryDirectory() as tmp:
        ort_note = _add_onnxruntime(models, shape, batches, tmp)
        rows = _timed_rows(models, shape, batches, opts)
    return {"benchmark": "inference latency, CPU, dense masked model vs sparse export (and ONNX Runtime)",
            "source": source, "input_shape": list(shape),
            "density": mask.density() if mask is not None else 1.0, "structure": opts.structure,
            "threads": torch.get_num_threads(), "repeats": int(opts.repeats), "warmup": int(opts.warmup),
            "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "onnxruntime": ort_note,
            "kernel_choice": opts.choose, "rows": rows, "params": compiled.report["params"],
            "export_equality": compiled.report["equality"],
            "kernels": [{"name": r["name"], "compact_shape": r["compact_shape"], "density": round(r["density"], 4),
                         "kernel": r["kernel"]} for r in compiled.report["layers"]],
            "max_abs_logit_diff": max(max(r["max_abs_logit_diff"] for r in rows),
                                      max(compiled.report["equality"]["max_abs_logit_diff"].values()))}


def _add_onnxruntime(models: dict, shape, batches, folder: str) -> str:
    """Add the ONNX Runtime session of ``models["dense"]`` to ``models``; return what was timed, or why not."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        return f"not timed: {exc.name} is not installed (pip install 'robustsparse[deploy]')"
    from .onnxrt import write_onnx, OnnxModel
    path = os.path.join(folder, "model.onnx")
    write_onnx(models["dense"], shape, path, batches)  # a file that fails its equality check is not timed
    models["onnxruntime"] = OnnxModel(path, shape, threads=torch.get_num_threads())
    return f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, {torch.get_num_threads()} intra-op thread(s)"


def _timed_rows(models: dict, shape, batches, opts) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(int(opts.seed) + 2)
    for b in batches:
        x = torch.rand((b, *shape), generator=gen)
        t = _time_interleaved(models, x, int(opts.repeats), int(opts.warmup))
        with torch.no_grad():
            diff = float((models["dense"](x) - models["exported"](x)).abs().max())
        row = {"batch": b, "dense_ms": t["dense"] * 1e3, "folded_ms": t["folded"] * 1e3,
               "exported_ms": t["exported"] * 1e3, "speedup": t["dense"] / t["exported"],
               "speedup_vs_folded": t["folded"] / t["exported"], "max_abs_logit_diff": diff}
        if "onnxruntime" in models:
            with torch.no_grad():
                ort_diff = float((models["dense"](x) - models["onnxruntime"](x)).abs().max())
            row.update(onnxruntime_ms=t["onnxruntime"] * 1e3, speedup_vs_onnxruntime=t["onnxruntime"] / t["exported"],
                       onnxruntime_max_abs_logit_diff=ort_diff)
        rows.append(row)
    return rows


def format_table(result: dict) -> str:
    src = result["source"]
    what = src.get("run") or f"{src['model']} {'x'.join(map(str, result['input_shape']))}, {src['mask']} " \
                             f"{result['structure']} mask ({src['scope']})"
    p = result["params"]
    lines = [f"{what}: density {result['density']:.4f}; layer weights {p['layer_weights_compact']:,} compact of "
             f"{p['layer_weights_original']:,} ({p['layer_weights_nonzero']:,} non-zero)",
             f"CPU, {result['threads']} thread(s), torch {result['torch']}, median of {result['repeats']} after "
             f"{result['warmup']} warm-up",
             f"ONNX Runtime: {result.get('onnxruntime', 'not timed')}",
             "| batch | dense ms | BN-folded ms | ONNX Runtime ms | exported ms | speed-up vs dense | vs folded | "
             "vs ONNX Runtime | max abs logit diff (export; ORT) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ort = "onnxruntime_ms" in r
        ort_ms = f"{r['onnxruntime_ms']:.2f}" if ort else "n/a"
        vs_ort = f"{r['speedup_vs_onnxruntime']:.2f}x" if ort else "n/a"
        diffs = f"{r['max_abs_logit_diff']:.1e}" + (f"; {r['onnxruntime_max_abs_logit_diff']:.1e}" if ort else "")
        lines.append(f"| {r['batch']} | {r['dense_ms']:.2f} | {r['folded_ms']:.2f} | {ort_ms} | {r['exported_ms']:.2f} "
                     f"| {r['speedup']:.2f}x | {r['speedup_vs_folded']:.2f}x | {vs_ort} | {diffs} |")
    return "\n".join(lines)


def bench_inference(args) -> int:
    """CLI entry (``robustsparse bench --inference``): prints the table; ``args.json``: a path to write the JSON
    to, or True to print JSON instead of the table."""
    opts = _options(args)
    out = opts.json if isinstance(opts.json, str) else None
    if out is not None and os.path.isdir(out):
        raise UserError(f"--json {out} is a folder; give a file path")
    result = run_inference_bench(opts, progress=not getattr(args, "no_progress", False))
    if opts.json is True:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    if out is not None:
        write_json_atomic(out, result, sort_keys=False)
        print(f"wrote {out}", file=sys.stderr)
    return 0
