"""Structured masks: whole channels, or N of every M weights; the one mask-selection entry point of the pruners.

``structure`` (``prune.structure``) says what a mask may look like:

* ``unstructured`` (default): any weight may go; `masks_from_scores` (exact top-k, global or per layer).
* ``channel``: whole groups go. For a ``Conv2d`` weight W[o, c, kh, kw] a group is one filter W[o] (output
  channel o); for a ``Linear`` weight W[o, i] a group is one input feature W[:, i] (its output units are the
  classes for the classifier, which must all stay). A group's score is the mean of its weights' scores,

      score(g) = (1 / |g|) Σ_{w ∈ g} s_w,

  so that groups of different sizes compare per weight. ``scope=layer``: each layer keeps its top
  ``round(d · G)`` groups. ``scope=global``: each layer first keeps its top ``max(1, ceil(min_layer_density · G))``
  groups (the layer-collapse guard), then groups are added in one global ranking while the kept weights stay
  ``<= round(d · total)``, so the density is at most ``d`` (groups are indivisible).
  Why: a zero filter lets the export drop the channel from the conv and from its consumer, a speed-up that a
  CPU sees at any batch size, which unstructured sparsity at d = 0.1 does not give (docs/benchmarks.md).
* ``N:M`` (e.g. ``2:4``): in every group of M consecutive input channels (conv: W[o, c:c+M, kh, kw]; linear:
  W[o, i:i+M]) exactly the N highest scores are kept, so the density is N/M (a trailing group of r < M channels
  keeps min(N, r)). The ``density`` argument is not used: N/M fixes it (the config checks that they agree).

Ties are broken by position (the earlier group or weight wins), so every mask is deterministic.
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from ..errors import UserError
from .mask import Mask, _top, masks_from_scores

STRUCTURES = ("unstructured", "channel", "N:M")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_structure(structure) -> tuple[str, int | None, int | None]:
    """``"unstructured"`` / ``"channel"`` / ``"N:M"`` -> (kind, N, M) with kind in unstructured|channel|nm."""
    if isinstance(structure, str) and structure.strip().lower() in ("unstructured", "channel"):
        return structure.strip().lower(), None, None
    m = _NM.match(structure) if isinstance(structure, str) else None
    if m is None:
        raise UserError(f"structure must be unstructured, channel or N:M (e.g. 2:4), got {structure!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 1 <= n < mm:
        raise UserError(f"structure {structure!r}: N:M needs 1 <= N < M (keep N of every M weights)")
    return "nm", n, mm


def structured_masks(scores: dict[str, Tensor], density: float, scope: str = "global",
                     min_layer_density: float = 0.0, structure: str = "unstructured", count: str = "round") -> Mask:
    """The mask of ``structure`` keeping the highest ``scores`` at ``density`` (see the module docstring).
    ``count`` (`kept_count`: round | reference) applies to unstructured masks; channel masks count by round."""
    kind, n, m = parse_structure(structure)
    if kind == "unstructured":
        return masks_from_scores(scores, density, scope, min_layer_density, count=count)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise UserError(f"density must be in (0, 1] (the fraction of weights kept), got {density!r}")
    if isinstance(min_layer_density, bool) or not isinstance(min_layer_density, (int, float)) \
            or not 0 <= min_layer_density <= 1:
        raise UserError(f"min_layer_density must be in [0, 1], got {min_layer_density!r}")
    if not isinstance(scope, str) or scope.lower() not in ("global", "layer", "local"):
        raise UserError(f"mask scope must be 'global' or 'layer' ('local' is accepted as 'layer'), got {scope!r}")
    if not isinstance(scores, dict) or not scores:
        raise UserError("scores must be a non-empty dict of parameter name -> tensor")
    for name, s in scores.items():
        if not isinstance(s, Tensor) or s.numel() == 0:
            raise UserError(f"score for {name!r} must be a non-empty tensor keyed by a parameter name")
        if torch.isnan(s).any():
            raise UserError(f"score for {name!r} contains NaN; cannot rank its weights")
    if kind == "nm":
        return Mask._trusted({k: n_of_m_mask(s, n, m) for k, s in scores.items()})
    return channel_masks(scores, density, scope, min_layer_density)


def _groups(s: Tensor) -> Tensor:
    """[G, group size] view of a score tensor: conv/other -> one row per output filter; linear -> per input."""
    s = s.detach().to(torch.float64)
    return s.t().contiguous() if s.dim() == 2 else s.reshape(s.shape[0], -1)


def _ungroup(keep_groups: Tensor, like: Tensor) -> Tensor:
    """Expand a [G] boolean group choice back to a 0/1 float32 tensor shaped like the weight."""
    if like.dim() == 2:
        return keep_groups[None, :].expand(like.shape).to(torch.float32).clone()
    return keep_groups.reshape(-1, *([1] * (like.dim() - 1))).expand(like.shape).to(torch.float32).clone()


def channel_masks(scores: dict[str, Tensor], density: float, scope: str = "global",
                  min_layer_density: float = 0.0) -> Mask:
    """Whole-channel masks (conv filters, linear input features) at about ``density`` (at most, globally)."""
    names = list(scores)
    group_scores = [_groups(scores[k]).mean(dim=1) for k in names]  # -inf stays -inf (SynFlow's pruned groups)
    sizes = [scores[k].numel() // g.numel() for k, g in zip(names, group_scores)]
    counts = [g.numel() for g in group_scores]
    mins = [min(c, max(1, math.ceil(round(min_layer_density * c, 9)))) for c in counts]
    if scope.lower() in ("layer", "local"):
        keeps = [_top(g, min(c, max(lo, round(density * c)))) for g, c, lo in zip(group_scores, counts, mins)]
    else:
        total = sum(scores[k].numel() for k in names)
        budget = round(density * total) - sum(lo * sz for lo, sz in zip(mins, sizes))
        if budget < 0:
            raise UserError(f"density {density} keeps {round(density * total)} of {total} weights, fewer than the "
                            f"whole channels needed to keep at least max(1, ceil({min_layer_density} * channels)) "
                            f"in each of the {len(names)} layers; raise density or lower min_layer_density")
        keeps = [_top(g, lo) for g, lo in zip(group_scores, mins)]
        # One global ranking of the remaining groups: higher score first, then earlier layer, then lower index.
        cand_score, cand_size, cand_where = [], [], []
        for li, (g, k, sz) in enumerate(zip(group_scores, keeps, sizes)):
            idx = (~k).nonzero().flatten()
            cand_score.append(g[idx])
            cand_size.append(torch.full((idx.numel(),), sz, dtype=torch.int64))
            cand_where.append(torch.stack([torch.full_like(idx, li), idx], dim=1))
        score_all, size_all = torch.cat(cand_score), torch.cat(cand_size)
        where = torch.cat(cand_where)
        order = torch.argsort(-score_all, stable=True)
        taken = order[torch.cumsum(size_all[order], 0) <= budget]
        for li, gi in where[taken].tolist():
            keeps[li][gi] = True
    return Mask._trusted({k: _ungroup(keep, scores[k]) for k, keep in zip(names, keeps)})


def n_of_m_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive input-channel entries (dim 1); 0/1 float32 like score."""
    s = score.detach().to(torch.float64)
    moved = s.movedim(1, -1) if s.dim() >= 2 else s[None]      # [..., C]
    c = moved.shape[-1]
    pad = (-c) % m
    padded = torch.cat([moved, moved.new_full((*moved.shape[:-1], pad), float("-inf"))], -1) if pad else moved
    grouped = padded.reshape(*padded.shape[:-1], -1, m)
    # Rank inside each group; a stable sort of -score makes the earlier entry win ties (padding comes last).
    order = torch.argsort(-grouped, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m).expand_as(order).contiguous())
    keep = (rank < n).reshape(*padded.shape[:-1], -1)[..., :c]
    keep = keep.movedim(-1, 1) if s.dim() >= 2 else keep[0]
    return keep.to(torch.float32).contiguous()


def select_mask(scores: dict[str, Tensor], prune_cfg, scope: str, density: float | None = None) -> Mask:
    """The pruners' one call: ``prune_cfg`` (a `PruneConfig`) gives structure, density and the collapse guard."""
    return structured_masks(scores, prune_cfg.density if density is None else density, scope,
                            prune_cfg.min_layer_density, getattr(prune_cfg, "structure", "unstructured"))
