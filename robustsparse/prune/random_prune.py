"""Random pruning scores: ``S(θ) ~ N(0, 1)`` i.i.d. per weight.

The baseline of Tanaka et al. (2020), "Pruning neural networks without any data by iteratively conserving synaptic
flow" (NeurIPS), Synaptic-Flow reference code ``Pruners/pruners.py::Rand`` (``torch.randn_like(p)``). Here the draw
comes from a ``torch.Generator`` seeded by opt ``seed`` (default 0), on the CPU in parameter order, so the scores
(hence the mask) are the same on every device. Data-free and weight-free: ``batches`` and ``masks`` are ignored
(keeping already pruned entries pruned is the mask step's job).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .scoring import _prunable, check_masks

REQUIRES_DATA = False


def score(model: nn.Module, batches=None, *, masks: dict[str, Tensor] | None = None, seed: int = 0
          ) -> dict[str, Tensor]:
    weights = _prunable(model)
    check_masks(weights, masks)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return {name: torch.randn(w.shape, generator=gen, dtype=torch.float32).to(device=w.device)
            for name, w in weights.items()}
