"""GraSP scores (Wang, Zhang & Grosse, 2020, "Picking winning tickets before training by preserving gradient flow",
ICLR), as in the Synaptic-Flow reference code (Tanaka et al., 2020, ``Pruners/pruners.py::GraSP``, itself based
on ``alecwangcq/GraSP``), with temperature T (opt ``temperature``, default 200):

    g   = Σ_batches ∇_θ CE(f(x; θ ⊙ m) / T, y)                      (no graph)
    Hg  = Σ_batches ∇_θ [ g · ∇_θ CE(f(x; θ ⊙ m) / T, y) ]          (double backward, g held fixed)
    S(θ) = (Hg ⊙ θ) / (|Σ_all-layers Hg ⊙ θ| + 1e-10)

θ and H are restricted to the prunable weights (conv/linear ``.weight``), as in the reference.

With a mask m, the derivatives are taken with respect to θ while the forward pass uses θ ⊙ m, as the reference's
masked layers compute ``F.conv2d(x, m ⊙ θ)``. So, with w = θ ⊙ m and H_w the Hessian in w,

    g = m ⊙ ∇_w L,    Hg = m ⊙ H_w (m ⊙ g),

and pruned coordinates neither enter Hg nor get a score. (Differentiating with respect to w itself would give
H_w g with g unmasked, which mixes in the pruned coordinates' curvature.) θ is taken masked (θ ⊙ m, the
reference's ``apply_mask`` before scoring); without a mask m = 1 and nothing changes.

Sign convention: **higher = keep**. GraSP's paper scores ``S_paper = −θ ⊙ Hg`` and removes the *largest*
``S_paper``; that is the same as keeping the largest ``θ ⊙ Hg``, which is what the reference code computes
(``p.grad * p.data``, not negated) and then masks with "keep the top scores". So the returned score is *signed*
(``+θ ⊙ Hg``, normalised), and the usual top-k mask implements GraSP. Pruned entries (``m = 0``) score 0.

Mode: eval by default (the reference's ``prune_loop`` calls ``model.eval()``); opt ``train_mode=True`` uses batch
statistics. The model's parameters, buffers and modes are left unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scoring import (_prunable, check_masks, cloned_buffers, device_of, forward_with, masked_leaves, module_modes,
                      require_batches)

REQUIRES_DATA = True
EPS = 1e-10


def score(model: nn.Module, batches, *, masks: dict[str, Tensor] | None = None, temperature: float = 200.0,
          train_mode: bool = False) -> dict[str, Tensor]:
    batches = require_batches(batches, "GraSP")
    leaves = masked_leaves(model, masks)
    full = check_masks(_prunable(model), masks)
    names = list(leaves)
    params = [leaves[n] for n in names]
    dev = device_of(model)

    def loss_of(tensors, x, y):
        # the mask in the forward pass (m ⊙ θ), so every derivative in θ carries the factor m
        tensors = {**tensors, **{n: leaves[n] * full[n] for n in names}}
        return F.cross_entropy(forward_with(model, tensors, x.to(dev)) / temperature, y.to(dev))

    def as_dense(grads):
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    with module_modes(model, bool(train_mode)):
        buffers = cloned_buffers(model)
        tensors = {**buffers, **leaves}
        g = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            for acc, gi in zip(g, as_dense(torch.autograd.grad(loss_of(tensors, x, y), params, allow_unused=True))):
                acc += gi
        hg = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            grads = as_dense(torch.autograd.grad(loss_of(tensors, x, y), params, create_graph=True,
                                                 allow_unused=True))
            z = sum((gi * gr).sum() for gi, gr in zip(g, grads) if gr.requires_grad)
            if not isinstance(z, Tensor) or not z.requires_grad:
                continue  # the loss is linear in θ here: Hg = 0 for this batch
            for acc, h in zip(hg, as_dense(torch.autograd.grad(z, params, allow_unused=True))):
                acc += h
    scores = {n: h * p.detach() for n, h, p in zip(names, hg, params)}
    norm = torch.abs(sum(s.sum() for s in scores.values())) + EPS
    return {n: s / norm for n, s in scores.items()}
