"""``robustsparse export``: turn a masked model into a deployable program whose inference skips the zeros.

Pipeline (each step in its own file): `lower` (fx trace, BN folded into convs, effective weights w·m) →
`compact` (drop the channels nothing needs or that do not depend on the input; fold the fixed ones into biases)
→ `kernels` (per layer and target batch size, the faster of a dense and a CSR kernel, timed here) → a check that
the program's logits equal the masked model's within ``tol`` (max |Δlogit| on seeded uniform [0, 1] images at
every target batch size; stored in ``export.json``; a failed check writes nothing) → the folder:

    <out>/
      export.json                    format, program (ops), weights file + SHA-256, equality check, per-layer
                                     kernels and timings, parameter counts, machine/threads, source run
      model.<sha12>.safetensors      the program's tensors; metadata holds the program's SHA-256
      load_sparse.py                 standalone loader (torch + safetensors only): `load(DIR)(images)`
      model.onnx                     with --format onnx (needs onnx + onnxruntime, the `deploy` extra): the
                                     dense-equivalent graph (masked weights as zeros), opset 17, dynamic batch;
                                     its SHA-256 and its ONNX Runtime equality check are in export.json ("onnx");
                                     run it with `load_onnx(DIR)` / `run_onnx(DIR, images)` (onnxrt.py)

The folder is built under a temporary name and renamed at the end, so an error leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..utils.progress import progress_bar
from . import runtime
from .compact import emit
from .kernels import choose_kernels
from .lower import effective_copy, lower
from .onnxrt import ONNX_FILE, require_deploy, write_onnx

FORMATS = ("safetensors", "onnx")
DEFAULT_BATCHES = (1, 256)


@dataclass
class CompiledExport:
    program: dict
    tensors: dict[str, torch.Tensor]
    report: dict = field(default_factory=dict)

    def model(self) -> runtime.SparseModel:
        return runtime.SparseModel(self.program, self.tensors).eval()


def input_shape_of(model: torch.nn.Module, input_shape=None) -> tuple[int, int, int]:
    if input_shape is None:
        if not hasattr(model, "input_size") or not hasattr(model, "in_channels"):
            raise UserError("give input_shape=(C, H, W): the model is not a robustsparse ImageClassifier")
        input_shape = (model.in_channels, *model.input_size)
    shape = tuple(input_shape)
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise UserError(f"input_shape must be (channels, height, width) of positive integers, got {input_shape!r}")
    return shape


def parse_batches(batches) -> list[int]:
    """``"1,256"`` or an iterable of ints -> sorted unique positive batch sizes."""
    try:
        items = [int(b) for b in (batches.split(",") if isinstance(batches, str) else batches) if str(b).strip()]
    except (TypeError, ValueError):
        raise UserError(f"batch sizes must be comma-separated positive integers, got {batches!r}") from None
    if not items or any(b < 1 for b in items):
        raise UserError(f"batch sizes must be comma-separated positive integers, got {batches!r}")
    return sorted(set(items))


def parse_formats(formats) -> list[str]:
    items = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise UserError(f"--format must be a comma-separated subset of {', '.join(FORMATS)}, got {formats!r}")
    return ["safetensors"] + [f for f in items if f != "safetensors"]  # safetensors is the export itself


def max_logit_difference(reference, exported, input_shape, batches, seed: int = 0) -> dict[str, float]:
    """max |f_ref(x) − f_exp(x)| over seeded uniform [0, 1] images, per batch size."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for b in batches:
            x = torch.rand((b, *input_shape), generator=gen)
            out[str(b)] = float((reference(x).float() - exported(x)).abs().max())
    return out


def compile_model(model: torch.nn.Module, input_shape=None, batches=DEFAULT_BATCHES, choose: str = "time",
                  repeats: int = 5, tol: float = 1e-4, seed: int = 0, progress: bool = True) -> CompiledExport:
    """Compile ``model`` (a masked or dense model; not modified) to an export program, check it and report.
    ``choose``: ``time`` (measure each layer's kernels), ``rule`` (see `kernels`), or ``dense`` (no compaction,
    dense kernels only: the same runtime with BN folded, which benchmarks use to separate the two gains)."""
    if choose not in ("time", "rule", "dense"):
        raise UserError(f"kernel choice must be 'time' (measured), 'rule' or 'dense', got {choose!r}")
    shape = input_shape_of(model, input_shape)
    batches = parse_batches(batches)
    started = time.perf_counter()
    reference = effective_copy(model)
    nodes, output_id = lower(reference, shape)
    em, layers, out_value = emit(nodes, output_id, compact=choose != "dense")
    with progress_bar(total=len(layers), desc="export: timing kernels", unit="layer",
                      enabled=progress and choose == "time") as bar:
        choose_kernels(em.ops, em.tensors, layers, batches, choose, repeats, seed, bar)
    program = {"input_shape": list(shape), "num_classes": nodes[output_id].shape[0], "plans": batches,
               "ops": em.ops, "output": out_value}
    compiled = CompiledExport(program, em.tensors)
    diff = max_logit_difference(reference, compiled.model(), shape, batches, seed)
    worst = max(diff.values())
    if not worst <= tol:
        raise UserError(f"the exported model's logits differ from the masked model's by up to {worst:.3g} "
                        f"(> tolerance {tol:g}); nothing was written")
    original = sum(p.numel() for p in model.parameters())
    compiled.report = {
        "equality": {"max_abs_logit_diff": diff, "tolerance": tol, "passed": True,
                     "inputs": f"uniform [0, 1] images, torch seed {seed}, one batch per plan size"},
        "layers": layers,
        "params": {"model_parameters": original,
                   "model_nonzero_parameters": sum(int(p.count_nonzero()) for p in reference.parameters()),
                   "layer_weights_original": sum(_numel(r["original_shape"]) for r in layers),
                   "layer_weights_compact": sum(_numel(r["compact_shape"]) for r in layers),
                   "layer_weights_nonzero": sum(r["nonzeros"] for r in layers),
                   "stored_values": sum(t.numel() for k, t in em.tensors.items()
                                        if t.is_floating_point())},
        "kernel_choice": choose, "timing_repeats": repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(), "seconds": round(time.perf_counter() - started, 2)}
    return compiled


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_out(out_dir: str) -> None:
    if not isinstance(out_dir, str) or not out_dir:
        raise UserError("--out must name the export folder to create")
    if os.path.exists(out_dir):
        raise UserError(f"{out_dir} already exists; choose a new export folder")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise UserError(f"the parent folder of {out_dir} does not exist")


def export_model(model: torch.nn.Module, out_dir: str, *, formats=("safetensors",), source: dict | None = None,
                 input_shape=None, batches=DEFAULT_BATCHES, choose: str = "time", repeats: int = 5,
                 tol: float = 1e-4, seed: int = 0, progress: bool = True) -> dict:
    """Compile ``model`` and write the export folder ``out_dir`` (must not exist). Returns the export JSON."""
    formats = parse_formats(formats)
    if "onnx" in formats:
        require_deploy()  # before any work: a requested format that cannot be written is an error
    _check_out(out_dir)
    compiled = compile_model(model, input_shape, batches, choose, repeats, tol, seed, progress)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        digest_program = runtime.program_digest(compiled.program)
        weights_tmp = os.path.join(tmp, "weights.tmp")
        save_file(compiled.tensors, weights_tmp, metadata={"format": runtime.FORMAT,
                                                          "program_sha256": digest_program})
        digest = runtime.sha256_file(weights_tmp)
        weights = f"model.{digest[:12]}.safetensors"
        os.replace(weights_tmp, os.path.join(tmp, weights))
        shutil.copyfile(runtime.__file__, os.path.join(tmp, "load_sparse.py"))
        from .._version import __version__
        meta = {"format": runtime.FORMAT, "library_version": __version__, "weights": weights, "sha256": digest,
                "program": compiled.program, "source": source or {}, **compiled.report,
                "loader": "python -c 'from load_sparse import load; m = load(\".\")' (torch + safetensors only), "
                          "or robustsparse.export.load_exported(DIR)"}
        if "onnx" in formats:
            meta["onnx"] = write_onnx(effective_copy(model), tuple(compiled.program["input_shape"]),
                                      os.path.join(tmp, ONNX_FILE), compiled.program["plans"], tol, seed)
        with open(os.path.join(tmp, runtime.PROGRAM_FILE), "w") as fh:
            json.dump(meta, fh, indent=1, sort_keys=True)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def export_run(run: str, out_dir: str, which: str = "best", lam: float | None = None, mix: str | None = None,
               **kw) -> dict:
    """Export the ``which`` checkpoint of a run folder (or a checkpoint .json/.safetensors) to ``out_dir``; a
    once-for-all run at trade-off ``lam`` (and SMART ``mix``), as `robustsparse.load` gives it."""
    from ..api import load, load_meta
    if "onnx" in parse_formats(kw.get("formats", ("safetensors",))):
        require_deploy()
    parse_batches(kw.get("batches", DEFAULT_BATCHES))
    _check_out(out_dir)
    meta = load_meta(run, which)
    model = load(run, which=which, lam=lam, mix=mix)
    source = {"run": os.path.abspath(run), "which": which, "checkpoint_sha256": meta.get("sha256"),
              "epoch": meta.get("epoch"), "model_spec": meta.get("model_spec")}
    if lam is not None:
        ofa = (meta.get("model_spec") or {}).get("ofa") or {}
        source.update(lam=lam, ofa_method=ofa.get("method"),
                      mix=(mix or ofa.get("options", {}).get("mix")) if ofa.get("method") == "smart" else None)
    return export_model(model, out_dir, source=source, **kw)


def load_exported(folder: str) -> runtime.SparseModel:
    """The exported model in ``folder`` (both hashes verified): an ``nn.Module`` in eval mode, images -> logits."""
    if not isinstance(folder, str) or not os.path.isdir(folder):
        raise UserError(f"{folder} is not an export folder (it does not exist)")
    try:
        return runtime.load(folder)
    except runtime.ExportFormatError as exc:
        raise UserError(str(exc)) from exc
