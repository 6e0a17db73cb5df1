"""Shared helpers of the pruning-at-initialization scorers (``random_prune``, ``magnitude``, ``snip``, ``grasp``,
``synflow``).

Every scorer has the contract::

    score(model, batches, *, masks=None, **opts) -> dict[str, Tensor]

one score tensor per prunable weight (the ``.weight`` of every ``nn.Conv2d`` / ``nn.Linear``, keyed by its name in
``model.named_parameters()``), same shape as the weight; **higher = more important** (a mask keeps the top scores).
``batches`` are ``(x, y)`` pairs with ``x`` in [0, 1]; ``masks`` (0/1, same keys) are applied to the weights while
scoring (``w * m``), as the Synaptic-Flow code's ``prune_loop`` does with ``pruner.apply_mask()`` before each score.

Scorers never modify the model: forward passes go through ``torch.func.functional_call`` with substituted leaf
tensors for the (masked) weights and *clones* of every buffer (BN running statistics stay as they were), the
training flags of all submodules are restored on exit, and no ``.grad`` is written to the model's parameters.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from robustsparse.errors import UserError

Batches = Iterable[tuple[Tensor, Tensor]]


def _prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``.weight`` of every ``nn.Conv2d`` / ``nn.Linear``, keyed by full parameter name, in parameter order.

    (Same definition as ``robustsparse.sparse.mask.prunable_parameters``; to be unified.)
    """
    wanted = {id(m.weight) for m in model.modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(getattr(m, "weight", None), nn.Parameter)}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def check_masks(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Validate ``masks`` against the prunable ``weights``; return a mask per weight (all-ones where none given)."""
    masks = dict(masks or {})
    unknown = sorted(set(masks) - set(weights))
    if unknown:
        raise UserError(f"masks for unknown or non-prunable parameter(s) {', '.join(unknown)}; "
                        f"prunable: {', '.join(weights)}")
    out = {}
    for name, w in weights.items():
        m = masks.get(name)
        if m is None:
            out[name] = torch.ones_like(w, dtype=w.dtype)
            continue
        if tuple(m.shape) != tuple(w.shape):
            raise UserError(f"mask for {name} has shape {tuple(m.shape)}, the weight has {tuple(w.shape)}")
        out[name] = m.detach().to(device=w.device, dtype=w.dtype)
    return out


def masked_leaves(model: nn.Module, masks: Mapping[str, Tensor] | None, *,
                  dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Fresh leaf tensors ``w * m`` (detached, ``requires_grad=True``) for every prunable weight."""
    weights = _prunable(model)
    full = check_masks(weights, masks)
    leaves = {}
    for name, w in weights.items():
        t = w.detach() * full[name]
        if dtype is not None:
            t = t.to(dtype)
        leaves[name] = t.requires_grad_(True)
    return leaves


def cloned_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Clones of all buffers, so that a forward in train mode updates the clones, never the model's BN stats."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def forward_with(model: nn.Module, tensors: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``model(x)`` with the given parameters/buffers substituted (the rest are the model's own)."""
    return functional_call(model, dict(tensors), (x,), strict=False)


@contextmanager
def module_modes(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Put ``model`` in train (``True``) or eval mode; restore every submodule's own ``training`` flag on exit."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def require_batches(batches, method: str) -> list[tuple[Tensor, Tensor]]:
    batches = list(batches or [])
    if not batches:
        raise UserError(f"{method} scores need at least one (x, y) batch of data; got none")
    return batches


def topk_masks(scores: Mapping[str, Tensor], density: float, scope: str = "global") -> dict[str, Tensor]:
    """0/1 float32 masks keeping exactly ``round(density * n)`` entries with the highest scores.

    ``scope="global"`` ranks all entries of all tensors together (``n`` = total count); ``"local"`` (alias
    ``"layer"``) ranks each tensor on its own (``n`` = its numel). Ties are broken deterministically: the earlier
    entry (in the dict's order, then flattened order) wins. Entries scored ``-inf`` are ranked last. NaN scores
    are an error.
    """
    if not 0.0 <= density <= 1.0:
        raise UserError(f"density must be in [0, 1], got {density!r}")
    if scope not in ("global", "local", "layer"):
        raise UserError(f"scope must be 'global' or 'local' (alias 'layer'), got {scope!r}")
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise ValueError(f"NaN in the scores of {name}")

    def keep_top(flat: Tensor, k: int) -> Tensor:
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        if k > 0:
            order = torch.sort(flat, descending=True, stable=True).indices
            keep[order[:k]] = True
        return keep

    if scope != "global":
        return {name: keep_top(s.detach().flatten().to(torch.float64), round(density * s.numel()))
                .reshape(s.shape).to(torch.float32) for name, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().to(torch.float64) for n in names])
    keep = keep_top(flat, round(density * flat.numel()))
    out, pos = {}, 0
    for n in names:
        s = scores[n]
        out[n] = keep[pos:pos + s.numel()].reshape(s.shape).to(torch.float32)
        pos += s.numel()
    return out


def check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0.0 < density <= 1.0) \
            or math.isnan(density):
        raise UserError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)
