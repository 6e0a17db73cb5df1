"""How sparse a model really is: kept weights per layer, non-zero parameters, and dense vs sparse MACs.

Density = kept / total over the prunable weights (every Conv2d/Linear ``.weight``, see `robustsparse.sparse.mask`).
"Kept" here is measured, not assumed: the exact non-zeros of the weight the forward pass uses (``weight * mask``
for a masked model), so the report is true for a checkpoint whatever produced it.

MACs are counted at batch 1 with forward hooks on a real forward pass (a zeros input, eval mode, no grad), so
strides, padding and pooling are whatever the model does: conv = output elements * (in_channels / groups) * kH *
kW; linear = in_features * out_features per output row. Sparse (unstructured) MACs count only non-zero weights:
each conv weight is used once per output position, so a layer's sparse MACs = its dense MACs * kept / total,
exactly. Other layers (BN, pooling, additions) are not counted, as in the usual thop-style figure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .mask import _prunable_modules


@dataclass
class LayerRow:
    name: str                      # parameter name, e.g. net.layer1.0.conv1.weight
    shape: tuple[int, ...]
    kept: int                      # exact non-zeros of the effective weight
    total: int
    density: float
    macs: int                      # dense MACs at batch 1
    sparse_macs: int               # MACs of the non-zero weights


@dataclass
class SparsityReport:
    input_shape: tuple[int, int, int]
    rows: list[LayerRow] = field(default_factory=list)
    total_params: int = 0          # all parameters
    nonzero_params: int = 0        # all parameters that are exactly non-zero (masked weights count as zero)
    prunable_total: int = 0
    prunable_kept: int = 0
    density: float = 0.0           # prunable_kept / prunable_total
    dense_macs: int = 0
    sparse_macs: int = 0
    masked: bool = False           # whether the model carries a mask (weight_mask buffers)

    def table(self) -> str:
        """A markdown table: one row per prunable layer, then the totals."""
        lines = ["| layer | shape | kept | total | density | MACs | sparse MACs |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r.name} | {'x'.join(map(str, r.shape))} | {r.kept:,} | {r.total:,} | "
                         f"{r.density:.4f} | {r.macs:,} | {r.sparse_macs:,} |")
        lines.append(f"| **total** | | {self.prunable_kept:,} | {self.prunable_total:,} | {self.density:.4f} | "
                     f"{self.dense_macs:,} | {self.sparse_macs:,} |")
        ratio = self.sparse_macs / self.dense_macs if self.dense_macs else float("nan")
        lines.append("")
        lines.append(f"Parameters: {self.nonzero_params:,} non-zero of {self.total_params:,}. "
                     f"MACs at input {'x'.join(map(str, self.input_shape))}, batch 1: {self.sparse_macs:,} sparse "
                     f"of {self.dense_macs:,} dense ({ratio:.4f}).")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def _input_shape(input_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise UserError(f"input_shape must be (channels, height, width) of positive integers, got {input_shape!r}")
    return shape


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """Dense MACs of one call at the given output (batch already 1)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    return out.numel() * module.in_features       # Linear: out.numel() = rows * out_features


def sparsity_report(model: nn.Module, input_shape: tuple[int, int, int]) -> SparsityReport:
    """Measure ``model`` (unchanged afterwards: modes restored, no weights touched) at images of ``input_shape``."""
    shape = _input_shape(input_shape)
    modules = _prunable_modules(model)
    if not modules:
        raise UserError("the model has no Conv2d/Linear weights to report on")
    macs = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(mod, args, out, name=name):
            macs[name] += _layer_macs(mod, out)
        handles.append(module.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    first = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=first.device, dtype=first.dtype))
    except RuntimeError as exc:
        raise UserError(f"the model cannot run on inputs of shape {shape}: {str(exc).splitlines()[0]}") from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training

    report = SparsityReport(input_shape=shape)
    report.masked = any("weight_mask" in m._buffers for m in modules.values())
    prunable_ids = {id(m.weight) for m in modules.values()}
    for name, module in modules.items():
        w = module.weight.detach()
        mask = module._buffers.get("weight_mask")
        effective = w * mask if mask is not None else w
        kept, total = int(effective.count_nonzero()), w.numel()
        sparse = macs[name] // total * kept        # dense MACs are positions * total exactly
        report.rows.append(LayerRow(name, tuple(w.shape), kept, total, kept / total, macs[name], sparse))
    for p in model.parameters():
        report.total_params += p.numel()
        if id(p) not in prunable_ids:
            report.nonzero_params += int(p.detach().count_nonzero())
    report.prunable_total = sum(r.total for r in report.rows)
    report.prunable_kept = sum(r.kept for r in report.rows)
    report.nonzero_params += report.prunable_kept
    report.density = report.prunable_kept / report.prunable_total
    report.dense_macs = sum(r.macs for r in report.rows)
    report.sparse_macs = sum(r.sparse_macs for r in report.rows)
    return report
