"""SNIP scores (Lee, Ajanthan & Torr, 2019, "SNIP: Single-shot network pruning based on connection sensitivity",
ICLR): connection sensitivity

    S(θ) = |g ⊙ θ| / Σ_all-layers |g ⊙ θ|,    g = Σ_batches ∇_θ CE(f(x; θ ⊙ m), y)    (CE: batch mean)

following the Synaptic-Flow reference code (Tanaka et al., 2020, ``Pruners/pruners.py::SNIP``): the gradients are
accumulated over all given batches first, then multiplied by the (masked) weights, ``abs``-ed, and normalised by
their sum over all prunable layers. Pruned entries (``m = 0``) score 0.

Mode: the reference's ``prune_loop`` calls ``model.eval()`` before scoring, so by default (opt
``train_mode=False``) the network runs in eval mode (BN uses its running statistics: deterministic, independent of
the batch composition). ``train_mode=True`` uses batch statistics instead; the model's running statistics are not
updated either way (scoring works on cloned buffers) and every module's mode is restored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scoring import cloned_buffers, device_of, forward_with, masked_leaves, module_modes, require_batches

REQUIRES_DATA = True


def score(model: nn.Module, batches, *, masks: dict[str, Tensor] | None = None, train_mode: bool = False
          ) -> dict[str, Tensor]:
    batches = require_batches(batches, "SNIP")
    leaves = masked_leaves(model, masks)
    names = list(leaves)
    grads = {n: torch.zeros_like(t) for n, t in leaves.items()}
    dev = device_of(model)
    with module_modes(model, bool(train_mode)):
        buffers = cloned_buffers(model)
        for x, y in batches:
            loss = F.cross_entropy(forward_with(model, {**buffers, **leaves}, x.to(dev)), y.to(dev))
            for n, g in zip(names, torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)):
                if g is not None:
                    grads[n] += g
    scores = {n: (grads[n] * leaves[n].detach()).abs() for n in names}
    total = sum(s.sum() for s in scores.values())
    if total > 0:  # all-zero sensitivities stay zero instead of 0/0
        scores = {n: s / total for n, s in scores.items()}
    return scores
