"""Runtime of a robustsparse sparse export: load and run it with only torch and safetensors installed.

This one file is both ``robustsparse.export.runtime`` and the ``load_sparse.py`` copied into every export
folder, so a deployment needs no robustsparse:

    from load_sparse import load               # or: from robustsparse.export import load_exported
    model = load("EXPORT_DIR")                 # verifies the hashes; an nn.Module in eval mode
    logits = model(images)                     # images: float [0, 1], shape (N, C, H, W) as exported

An export folder holds ``export.json`` (the program: a list of ops over numbered values, plus the checks made
at export), ``model.<sha12>.safetensors`` (its tensors) and this file. The JSON records the weights file's
SHA-256 and the weights file's metadata records the SHA-256 of the program, so an edit to either is refused.

Values are "compact": a value holds only the channels that something downstream reads and that are not
batch-independent. Every other channel is folded into a bias (``bias``, or ``bias_map`` when zero padding makes
its contribution depend on the position) or materialised from a stored ``fill`` map by a ``reindex`` op. Each
``conv``/``linear`` op names, for each batch size measured at export (``plans``), the kernel that was fastest
there: ``dense`` (the compact weight in a dense conv/matmul) or ``csr`` (a CSR weight times im2col columns);
a batch uses the plan of the nearest measured batch size (in log scale).
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

FORMAT = "robustsparse-export/1"
PROGRAM_FILE = "export.json"


class ExportFormatError(ValueError):
    """The folder is not a valid export (missing, damaged or altered files)."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def program_digest(program: dict) -> str:
    """SHA-256 of the program's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(program, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_export(folder: str) -> tuple[dict, dict]:
    """(export JSON, tensors) of ``folder`` after checking the format and both hashes."""
    path = os.path.join(folder, PROGRAM_FILE)
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except FileNotFoundError as exc:
        raise ExportFormatError(f"{folder} is not a sparse export ({PROGRAM_FILE} is missing)") from exc
    except (OSError, ValueError) as exc:
        raise ExportFormatError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("program"), dict):
        raise ExportFormatError(f"{path} is not a sparse export (expected format {FORMAT})")
    weights = meta.get("weights")
    if not isinstance(weights, str) or "/" in weights or "\\" in weights or not isinstance(meta.get("sha256"), str):
        raise ExportFormatError(f"{path} lacks a valid weights entry; the export is damaged")
    wpath = os.path.join(folder, weights)
    if not os.path.isfile(wpath):
        raise ExportFormatError(f"{path} names weights {weights} that are missing")
    if sha256_file(wpath) != meta["sha256"]:
        raise ExportFormatError(f"{wpath} does not match the hash recorded in {path}: the file is truncated or "
                                "was modified; refusing to load it")
    with safe_open(wpath, "pt") as fh:
        recorded = (fh.metadata() or {}).get("program_sha256")
    if recorded != program_digest(meta["program"]):
        raise ExportFormatError(f"the program in {path} does not match the one its weights were written with: "
                                "the JSON was modified; refusing to load it")
    return meta, load_file(wpath)


def load(folder: str) -> "SparseModel":
    """The exported model of ``folder`` (hashes verified), in eval mode, on the CPU."""
    meta, tensors = read_export(folder)
    return SparseModel(meta["program"], tensors).eval()


def _nearest_plan(plans: list[int], n: int) -> str:
    return str(min(plans, key=lambda b: (abs(math.log(n / b)), b)))


class SparseModel(torch.nn.Module):
    """Runs an export program. Tensors are buffers (``.to(device)`` works); CSR weights are built on first use."""

    def __init__(self, program: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.program = program
        self.input_shape = tuple(program["input_shape"])
        self.plans = [int(b) for b in program["plans"]]
        for key, t in tensors.items():
            self.register_buffer(key, t)
        self._csr: dict = {}
        # Free each value after its last reader, and let a value's only reader overwrite it (never the input).
        last_use, uses = {}, {}
        for i, op in enumerate(program["ops"]):
            for v in op.get("in", []):
                last_use[v] = i
                uses[v] = uses.get(v, 0) + 1
        inputs = {op["out"] for op in program["ops"] if op["op"] in ("input", "flatten")}  # the caller's x, views
        self._free_after = [[v for v in set(op.get("in", [])) if last_use[v] == i and v != program.get("output")]
                            for i, op in enumerate(program["ops"])]
        self._inplace = [bool(op.get("in")) and uses[op["in"][0]] == 1 and op["in"][0] not in inputs
                         and op["in"].count(op["in"][0]) == 1 for op in program["ops"]]

    def _t(self, key):
        return None if key is None else self._buffers[key]

    def csr(self, op: dict) -> torch.Tensor:
        """The op's weight as a 2-D CSR matrix [out, in * kH * kW], cached per device."""
        src = op["csr"]
        device = self._buffers[src[2]].device
        key = (src[2], str(device))
        if key not in self._csr:
            crow, col, val = (self._buffers[k] for k in src)
            # Checked once here: an inconsistent CSR tensor would make the sparse kernels read out of bounds.
            self._csr[key] = torch.sparse_csr_tensor(crow.long(), col.long(), val, size=tuple(op["matrix_shape"]),
                                                     check_invariants=True)
        return self._csr[key]

    def dense_weight(self, op: dict) -> torch.Tensor:
        if op.get("weight") is not None:
            return self._buffers[op["weight"]]
        key = ("dense", op["csr"][2], str(self._buffers[op["csr"][2]].device))
        if key not in self._csr:
            self._csr[key] = self.csr(op).to_dense().reshape(op["weight_shape"]).contiguous()
        return self._csr[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        plan = _nearest_plan(self.plans, max(1, x.shape[0]))
        values = {}
        for op, free, inplace in zip(self.program["ops"], self._free_after, self._inplace):
            args = [values[i] for i in op.get("in", [])]
            values[op["out"]] = run_op(self, op, args, x, plan, inplace)
            for v in free:
                del values[v]
        return values[self.program["output"]]


def _conv_dense(model, op, x):
    y = F.conv2d(x, model.dense_weight(op), model._t(op.get("bias")), op["stride"], op["padding"],
                 op["dilation"], op["groups"])
    return y


def _conv_csr(model, op, x):
    """CSR weight [O, C·kH·kW] times the im2col columns, one image at a time (a batched im2col is larger than
    the conv's own memory traffic and was slower in every measured case)."""
    csr = model.csr(op)
    oh, ow = op["out_hw"]
    kh, kw = op["weight_shape"][2:]
    out = x.new_empty(x.shape[0], csr.shape[0], oh * ow)
    pointwise = (kh, kw) == (1, 1) and op["padding"] == [0, 0] and op["dilation"] == [1, 1]
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        if pointwise:
            cols = xi[0, :, ::op["stride"][0], ::op["stride"][1]].reshape(xi.shape[1], -1)
        else:
            cols = F.unfold(xi, (kh, kw), op["dilation"], op["padding"], op["stride"])[0]
        out[i] = csr @ cols
    y = out.reshape(x.shape[0], csr.shape[0], oh, ow)
    bias = model._t(op.get("bias"))
    return y if bias is None else y.add_(bias.reshape(1, -1, 1, 1))


def _linear(model, op, x, kernel):
    bias = model._t(op.get("bias"))
    if kernel == "csr":
        y = (model.csr(op) @ x.t().contiguous()).t()
        return y if bias is None else y.add_(bias)
    return F.linear(x, model.dense_weight(op), bias)


def _reindex(model, op, x):
    index = model._t(op.get("index"))
    if op.get("fill") is None:
        return x.index_select(1, index)
    fill = model._t(op["fill"])
    out = fill.unsqueeze(0).expand(x.shape[0], *op["shape"]).clone()
    out.index_copy_(1, model._t(op["pos"]), x if index is None else x.index_select(1, index))
    return out


def run_op(model: SparseModel, op: dict, args: list, x: torch.Tensor, plan: str,
           inplace: bool = False) -> torch.Tensor:
    """One op; ``inplace``: its first argument is read by nothing else and may be overwritten."""
    kind = op["op"]
    if kind == "input":
        return x
    if kind == "conv":
        kernel = op["kernel"][plan]
        y = _conv_csr(model, op, args[0]) if kernel == "csr" else _conv_dense(model, op, args[0])
        bias_map = model._t(op.get("bias_map"))
        return y if bias_map is None else y.add_(bias_map)
    if kind == "linear":
        return _linear(model, op, args[0], op["kernel"][plan])
    if kind == "normalize":
        return (args[0] - model._t(op["mean"])) / model._t(op["std"])
    if kind == "affine":
        return args[0] * model._t(op["scale"]) + model._t(op["shift"])
    if kind == "relu":
        return F.relu(args[0], inplace=inplace)
    if kind == "add":
        return args[0].add_(args[1]) if inplace else args[0] + args[1]
    if kind == "reindex":
        return _reindex(model, op, args[0])
    if kind == "flatten":
        return args[0].flatten(1)
    if kind == "maxpool2d":
        return F.max_pool2d(args[0], op["kernel_size"], op["stride"], op["padding"], op["dilation"],
                            op["ceil_mode"])
    if kind == "avgpool2d":
        return F.avg_pool2d(args[0], op["kernel_size"], op["stride"], op["padding"], op["ceil_mode"],
                            op["count_include_pad"], op["divisor_override"])
    if kind == "adaptive_avgpool2d":
        return F.adaptive_avg_pool2d(args[0], op["output_size"])
    raise ExportFormatError(f"unknown op {kind!r} in the export program (written by a newer robustsparse?)")
