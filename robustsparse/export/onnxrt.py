"""ONNX export of a masked model, checked in ONNX Runtime, and a loader that runs it (``pip install .[deploy]``).

``write_onnx`` traces the dense-equivalent model (weights w·m, zeros included; BN left to ONNX Runtime, which
folds it) with the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, opset 17) into ``model.onnx``
with a **dynamic batch dimension** (input ``images`` of shape (batch, C, H, W), float32 in [0, 1]; output
``logits`` (batch, classes)). It then runs the file in ONNX Runtime and refuses it (UserError, nothing written)
unless max |logit_ORT − logit_torch| ≤ ``tol`` at every checked batch size. The exporter is the TorchScript one
because it needs neither onnxscript nor ``torch.export``: on this project's 2-core CI it writes a small CNN in
~2 s against ~10-20 s for the dynamo exporter, with the same outputs (measured: both within 3e-5 of torch).
torch 2.13 marks it deprecated; if a later torch removes it, ``write_onnx`` says so as a UserError.

``load_onnx(folder)`` checks the file against the SHA-256 that ``export.json`` recorded, opens an ONNX Runtime
CPU session and returns an `OnnxModel`: ``model(images) -> logits`` with the input's shape and range checked.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

from ..errors import UserError
from .runtime import PROGRAM_FILE, sha256_file

ONNX_FILE = "model.onnx"
OPSET = 17
INSTALL = "pip install 'robustsparse[deploy]' (onnx and onnxruntime)"


def require_deploy() -> None:
    """Raise a UserError naming the missing package unless both onnx and onnxruntime import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--format onnx needs the {exc.name} package, which is not installed: {INSTALL}") from exc


def _session(path: str, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are not the user's concern
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for an unreadable model
        raise UserError(f"ONNX Runtime cannot load {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") \
            from exc


class OnnxModel:
    """An ONNX Runtime session over a robustsparse ``model.onnx``: ``model(images) -> logits`` (a torch tensor).

    ``images``: a torch tensor or numpy float array of shape (N, C, H, W) as exported, values in [0, 1] (any
    normalisation is inside the graph; the range is not scanned per call). A wrong shape or a non-float dtype is a
    UserError here rather than ONNX Runtime's error from deep inside the graph."""

    def __init__(self, path: str, input_shape, threads: int | None = None):
        self.path = path
        self.input_shape = tuple(int(s) for s in input_shape)
        self.session = _session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images) -> torch.Tensor:
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape or x.shape[0] < 1:
            want = "x".join(map(str, self.input_shape))
            raise UserError(f"the ONNX model takes images of shape (N, {', '.join(map(str, self.input_shape))}) "
                            f"(N >= 1, {want} per image), got {tuple(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise UserError(f"the ONNX model takes float images in [0, 1], got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])


def _trace(model: torch.nn.Module, shape, path: str) -> None:
    # Two images, not one: a batch of one lets the tracer specialise batch-dependent shapes (flatten) to 1.
    example = torch.zeros((2, *shape))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice; the choice is documented above
            torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - any exporter failure means the requested format cannot be written
        raise UserError(f"--format onnx: torch.onnx.export failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); nothing was written") from exc


def write_onnx(model: torch.nn.Module, shape, path: str, batches, tol: float = 1e-4, seed: int = 0) -> dict:
    """Write ``model`` (eval mode, not modified) to ``path`` and check it in ONNX Runtime; return its JSON entry.

    Check: max |f_ORT(x) − f_torch(x)| ≤ ``tol`` on seeded uniform [0, 1] images at each of ``batches``. The
    two sides run different kernels (ORT's MLAS convolutions with BN folded in vs PyTorch's oneDNN/ATen ones), so
    they agree only up to float32 summation order: ~1e-6 relative, which 1e-4 absolute covers for logits of O(10)
    with room for AVX-512 vs AVX2 machines. A failure removes ``path`` and raises a UserError."""
    require_deploy()
    import onnx
    import onnxruntime

    _trace(model, shape, path)
    try:
        onnx.checker.check_model(path)
        runner = OnnxModel(path, shape, threads=torch.get_num_threads())
        gen = torch.Generator().manual_seed(seed)
        diff = {}
        with torch.no_grad():
            for b in batches:
                x = torch.rand((b, *shape), generator=gen)
                diff[str(b)] = float((model(x).float() - runner(x)).abs().max())
        worst = max(diff.values())
        if not worst <= tol:
            raise UserError(f"--format onnx: ONNX Runtime's logits differ from the masked model's by up to "
                            f"{worst:.3g} (> tolerance {tol:g}); nothing was written")
    except BaseException:
        os.remove(path)
        raise
    return {"file": ONNX_FILE, "sha256": sha256_file(path), "opset": OPSET,
            "exporter": "torch.onnx.export TorchScript (dynamo=False)", "graph": "dense-equivalent: masked weights "
            "are zeros, BN not folded (ONNX Runtime folds it)",
            "input": {"name": "images", "shape": ["batch", *shape], "dtype": "float32", "range": [0, 1]},
            "output": {"name": "logits", "shape": ["batch", None]},
            "equality": {"runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
                         "max_abs_logit_diff": diff, "tolerance": tol, "passed": True,
                         "inputs": f"uniform [0, 1] images, torch seed {seed}, one batch per size"},
            "onnx": onnx.__version__}


def load_onnx(folder: str, threads: int | None = None) -> OnnxModel:
    """The ONNX model of export ``folder`` in ONNX Runtime, after checking its SHA-256 against ``export.json``."""
    meta_path = os.path.join(str(folder), PROGRAM_FILE)
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} is not a robustsparse export ({PROGRAM_FILE} missing or unreadable)") from exc
    entry = meta.get("onnx") if isinstance(meta, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise UserError(f"{folder} holds no ONNX model; export it with --format onnx")
    path = os.path.join(str(folder), ONNX_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; the export is damaged")
    if sha256_file(path) != entry["sha256"]:
        raise UserError(f"{path} does not match the SHA-256 recorded in {meta_path}: the file is truncated or was "
                        "modified; refusing to run it")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UserError(f"running an ONNX export needs onnxruntime: {INSTALL}") from exc
    return OnnxModel(path, entry["input"]["shape"][1:], threads)


def run_onnx(folder: str, images, threads: int | None = None) -> torch.Tensor:
    """Logits of ``images`` ((N, C, H, W) in [0, 1]) from the ONNX model of export ``folder`` (hash checked)."""
    return load_onnx(folder, threads)(images)
