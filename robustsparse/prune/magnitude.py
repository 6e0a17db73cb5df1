"""Magnitude scores: ``S(θ) = |θ ⊙ m|``.

Global magnitude pruning at initialization, the baseline of Tanaka et al. (2020), "Pruning neural networks without
any data by iteratively conserving synaptic flow" (NeurIPS); Synaptic-Flow reference code
``Pruners/pruners.py::Mag`` (``torch.clone(p.data).detach().abs_()``, after ``apply_mask``). Data-free: ``batches``
is ignored. Already pruned entries (``m = 0``) score 0.
"""

from __future__ import annotations

from torch import Tensor, nn

from .scoring import _prunable, check_masks

REQUIRES_DATA = False


def score(model: nn.Module, batches=None, *, masks: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    weights = _prunable(model)
    full = check_masks(weights, masks)
    return {name: (w.detach() * full[name]).abs() for name, w in weights.items()}
