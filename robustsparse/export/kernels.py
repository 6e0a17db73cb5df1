"""Per-layer kernel choice: time the candidate kernels of each compact conv/linear at each target batch size.

Candidates: ``dense`` (the compact weight in ``F.conv2d``/``F.linear``, i.e. oneDNN/MKL) and ``csr`` (the
weight as a CSR matrix times im2col columns, ``torch.sparse`` on MKL; a 1x1 conv skips im2col). CSR is only
timed where the compact weight keeps at most ``CSR_MAX_DENSITY`` of its entries: above that it never won in our
measurements and timing it would only slow the export. Each candidate runs once to warm up, then ``repeats``
times; the median wins. A candidate whose warm-up already takes more than twice the dense median is not
repeated (it cannot win), which keeps exporting a ResNet-18 at batch 256 to tens of seconds.

``choose="dense"`` uses the dense kernel everywhere (the benchmarks' BN-folded control). ``choose="rule"`` skips
the timing: CSR where the compact density is at most ``RULE_DENSITY`` and the batch is
1, dense elsewhere (what the timings on our 2-core CPU chose for unstructured layers; docs/benchmarks.md).

Storage: a layer whose kernel is CSR at any batch size, or whose compact density is at most ``STORE_CSR_BELOW``,
is stored as CSR (int32 indices + values); the others as a dense compact weight.
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch

from .runtime import SparseModel, run_op

CSR_MAX_DENSITY = 0.5
RULE_DENSITY = 0.2
STORE_CSR_BELOW = 0.3


def _median_seconds(fn, repeats: int, give_up_after: float | None = None) -> float:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if give_up_after is not None and first > give_up_after:
        return first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def store_weight(op: dict, weight: torch.Tensor, tensors: dict, key_prefix: str, as_csr: bool) -> None:
    """Put the compact weight into ``tensors`` (dense, or CSR triple) and name it in ``op``."""
    for field in ("weight", "csr"):
        op.pop(field, None)
    if as_csr:
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and the equality check guards it
            warnings.simplefilter("ignore", UserWarning)
            m = weight.reshape(weight.shape[0], -1).to_sparse_csr()
        keys = [f"{key_prefix}_crow", f"{key_prefix}_col", f"{key_prefix}_val"]
        tensors[keys[0]] = m.crow_indices().to(torch.int32)
        tensors[keys[1]] = m.col_indices().to(torch.int32)
        tensors[keys[2]] = m.values().contiguous()
        op["csr"] = keys
    else:
        tensors[f"{key_prefix}_w"] = weight.contiguous()
        op["weight"] = f"{key_prefix}_w"


def choose_kernels(ops: list[dict], tensors: dict, layers: list[dict], batches: list[int], choose: str = "time",
                   repeats: int = 5, seed: int = 0, progress=None) -> None:
    """Set ``op["kernel"]`` (batch size -> dense|csr) and the weight storage of every layer; record timings."""
    gen = torch.Generator().manual_seed(seed)
    for layer in layers:
        op = ops[layer["op_index"]]
        weight = layer.pop("weight")
        density = layer["nonzeros"] / max(1, weight.numel())
        layer["density"] = density
        candidates = ["dense"] + (["csr"] if density <= CSR_MAX_DENSITY and op.get("groups", 1) == 1
                                  and weight.shape[0] > 0 and choose != "dense" else [])
        layer["seconds"] = {}
        for batch in batches:
            if choose == "rule" or len(candidates) == 1:
                op["kernel"][str(batch)] = "csr" if ("csr" in candidates and batch == 1
                                                     and density <= RULE_DENSITY) else "dense"
                continue
            x = torch.rand((batch, *layer["in_shape"]), generator=gen)
            timing = {}
            for kernel in candidates:
                local = {k: tensors[k] for k in (op.get("bias"), op.get("bias_map")) if k is not None}
                probe_op = dict(op, kernel={"b": kernel})
                store_weight(probe_op, weight, local, "probe", as_csr=kernel == "csr")
                probe = SparseModel({"input_shape": layer["in_shape"], "plans": [1], "ops": [probe_op]}, local)
                with torch.no_grad():
                    timing[kernel] = _median_seconds(lambda: run_op(probe, probe_op, [x], x, "b"), repeats,
                                                     None if kernel == "dense" else 2 * timing["dense"])
            op["kernel"][str(batch)] = min(timing, key=timing.get)
            layer["seconds"][str(batch)] = timing
        if progress is not None:
            progress.update(1)
        as_csr = "csr" in op["kernel"].values() or (density <= STORE_CSR_BELOW and choose != "dense")
        store_weight(op, weight, tensors, f"L{layer['op_index']}", as_csr)
        layer["kernel"] = dict(op["kernel"])
        layer["stored"] = "csr" if as_csr else "dense"
