"""SMART's two expert masks per layer: how they are drawn, how much they overlap, and the dual-mask layers.

Per split layer with n weights, the clean and adversarial experts keep k_c = round(d_c·n) and k_a = round(d_a·n)
weights (at least 1 each), chosen from a score per expert (higher = keep) under an overlap policy:

    independent    M_c = top_{k_c}(s_c),  M_a = top_{k_a}(s_a)                     (any overlap)
    complementary  M_a = top_{k_a}(s_a),  M_c = top_{k_c}(s_c on ¬M_a)             (disjoint; d_c + d_a ≤ 1)
    nested         the denser expert's top-k first, the sparser one's top-k inside it   (M_small ⊆ M_big)
    alternating    a draft: in each of R rounds M_a takes its ⌈k_a/R⌉ best free weights, then M_c its ⌈k_c/R⌉
                   best free ones                                                    (disjoint; d_c + d_a ≤ 1)

The adversarial expert chooses first under ``complementary``: at equal densities, when both scores rank the same
weights first (magnitude; AWT and NTT tickets, which both favour large |θ₀|) it takes the large half of every
layer and leaves the clean expert the small one, which starves it on a network without BN (measured on
Fashion-MNIST: docs/results/fashion_mnist.md). ``alternating`` is the fair disjoint split: with equal scores each
expert gets every other weight of the ranking, so both keep θ₀'s scale. For random scores the policies
``complementary`` and ``alternating`` draw the same distribution. Scores per ``ofa.mask_source``:
``random`` (i.i.d. uniform per expert, seeded; drawn as random permutations), ``magnitude`` (|W₀| for both
experts), ``learned`` (trainable scores, initialised to |W₀|·√(6/fan_in)/max|W₀| as HYDRA's scaled init, top-k
in every forward with a straight-through gradient), ``awt`` (the clean expert from an NTT ticket on clean points, the adversarial expert
from an AWT ticket on adversarial points, each at its density; ticket weights first, then |W₀|).

`DualMaskConv2d` / `DualMaskLinear` hold the shared weight W and the buffers ``mask_clean`` / ``mask_adv``; their
``route`` picks W ⊙ M_c ("clean"), W ⊙ M_a ("adv") or W ⊙ ((1−λ)M_c + λM_a) (("weight", λ)). The product is
formed in the forward pass, so autograd gives each path's loss a gradient only on that path's mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse.mask import _top

OVERLAPS = ("complementary", "nested", "independent", "alternating")
# Rounds of the `alternating` draft. Picking one weight at a time is sequential (n Python steps a layer). With
# 100 vectorised rounds and equal scores, each expert's share of the top j weights differs from that exact draft's
# by at most one round's picks (1% of its budget); a round is ~4 O(n) passes, once per model.
DRAFT_ROUNDS = 100
SOURCES = ("random", "magnitude", "learned", "awt")


def keep_count(density: float, n: int) -> int:
    return min(n, max(1, round(density * n)))


def expert_masks(s_clean: torch.Tensor, s_adv: torch.Tensor, k_clean: int, k_adv: int, overlap: str):
    """Boolean masks (shaped like the scores) of the two experts under ``overlap`` (module docstring)."""
    shape, n = s_clean.shape, s_clean.numel()
    sc, sa = s_clean.detach().flatten().float(), s_adv.detach().flatten().float()
    if overlap == "independent":
        mc, ma = _top(sc, k_clean), _top(sa, k_adv)
    elif overlap == "complementary":
        ma = _top(sa, k_adv)
        mc = _top(sc.masked_fill(ma, -math.inf), min(k_clean, n - k_adv))
    elif overlap == "alternating":
        mc, ma = _draft(sc, sa, k_clean, min(k_adv, n - k_clean))
    elif overlap == "nested":
        if k_clean <= k_adv:
            ma = _top(sa, k_adv)
            mc = _top(sc.masked_fill(~ma, -math.inf), k_clean)
        else:
            mc = _top(sc, k_clean)
            ma = _top(sa.masked_fill(~mc, -math.inf), k_adv)
    else:
        raise ValueError(f"unknown overlap {overlap!r}; known: {', '.join(OVERLAPS)}")
    return mc.view(shape), ma.view(shape)


def _draft(s_clean: torch.Tensor, s_adv: torch.Tensor, k_clean: int, k_adv: int, rounds: int = DRAFT_ROUNDS):
    """The ``alternating`` policy on 1-D scores: disjoint boolean masks of exactly k_clean and k_adv weights
    (k_clean + k_adv ≤ n); the adversarial expert picks first in every round; equal scores go to the lower index."""
    taken = torch.zeros(s_clean.numel(), dtype=torch.bool, device=s_clean.device)
    drafts = [_Drafter(s, k, rounds, taken) for s, k in ((s_adv, k_adv), (s_clean, k_clean))]
    for _ in range(rounds):
        for drafter in drafts:
            drafter.pick()
    return drafts[1].mask, drafts[0].mask


class _Drafter:
    """One expert's side of the draft: its ranking, and a cursor before which every weight is taken, so that a
    round scans only a window of the ranking (the whole draft is O(n) passes, not O(rounds · n))."""

    def __init__(self, scores, budget: int, rounds: int, taken):
        self.order = torch.sort(-scores, stable=True).indices
        self.mask, self.taken, self.left = torch.zeros_like(taken), taken, budget
        self.per_round, self.cursor = math.ceil(budget / rounds), 0

    def pick(self) -> None:
        want = min(self.per_round, self.left)
        if want <= 0:
            return
        size = 2 * want
        while True:  # widen the window until it holds `want` free weights (there are enough: k_c + k_a <= n)
            window = self.order[self.cursor:self.cursor + size]
            free = ~self.taken[window]
            if int(free.count_nonzero()) >= want or self.cursor + size >= self.order.numel():
                break
            size *= 2
        chosen = free & (free.cumsum(0) <= want)
        self.mask[window[chosen]] = True
        self.taken[window[chosen]] = True
        self.left -= want
        still_free = (free & ~chosen).nonzero()
        self.cursor += int(still_free[0]) if still_free.numel() else window.numel()


def random_expert_masks(shape, k_clean: int, k_adv: int, overlap: str, generator: torch.Generator):
    """The ``random`` source without sorting: slices of random permutations (the same distribution as top-k of
    i.i.d. uniform scores under each overlap policy, at a fraction of the cost on large layers)."""
    n = math.prod(shape)
    perm = torch.randperm(n, generator=generator)
    first = torch.zeros(n, dtype=torch.bool)
    second = torch.zeros(n, dtype=torch.bool)
    if overlap in ("complementary", "alternating"):  # i.i.d. scores: a draft is the same disjoint split
        second[perm[:k_adv]] = True
        first[perm[k_adv:k_adv + min(k_clean, n - k_adv)]] = True
    elif overlap == "nested":  # the sparser expert is a random subset of the denser one
        big, small = (second, first) if k_clean <= k_adv else (first, second)
        big[perm[:max(k_clean, k_adv)]] = True
        small[perm[:min(k_clean, k_adv)]] = True
    else:
        first[perm[:k_clean]] = True
        second[torch.randperm(n, generator=generator)[:k_adv]] = True
    return first.view(shape), second.view(shape)


class _DualMask:
    """Mixin for a Conv2d/Linear carrying two expert masks; see the module docstring."""

    def _init_dual(self, k_clean: int, k_adv: int, overlap: str, learned: bool) -> None:
        self.k_clean, self.k_adv, self.overlap, self.learned = k_clean, k_adv, overlap, learned
        ones = torch.ones_like(self.weight, dtype=torch.float32)
        self.register_buffer("mask_clean", ones.clone())
        self.register_buffer("mask_adv", ones.clone())
        if learned:
            self.score_clean = nn.Parameter(torch.zeros_like(self.weight))
            self.score_adv = nn.Parameter(torch.zeros_like(self.weight))
        self.route = "clean"

    def set_masks(self, m_clean: torch.Tensor, m_adv: torch.Tensor) -> None:
        with torch.no_grad():
            self.mask_clean.copy_(m_clean)
            self.mask_adv.copy_(m_adv)

    def _masks(self):
        """(M_c, M_a) as used in the forward pass: the buffers, or for learned masks top-k of the scores with a
        straight-through gradient (value exactly the hard mask; gradient passed to the score unchanged)."""
        if not self.learned:
            return self.mask_clean, self.mask_adv
        hard_c, hard_a = expert_masks(self.score_clean, self.score_adv, self.k_clean, self.k_adv, self.overlap)
        self.set_masks(hard_c, hard_a)  # the buffers always hold the masks of the current scores
        return (self.mask_clean + (self.score_clean - self.score_clean.detach()),
                self.mask_adv + (self.score_adv - self.score_adv.detach()))

    def path_mask(self, route=None) -> torch.Tensor:
        route = self.route if route is None else route
        m_clean, m_adv = self._masks()
        if route == "clean":
            return m_clean
        if route == "adv":
            return m_adv
        kind, lam = route
        if kind != "weight":
            raise ValueError(f"invalid SMART route {route!r}")
        return (1 - lam) * m_clean + lam * m_adv

    def routed_weight(self) -> torch.Tensor:
        return self.weight * self.path_mask()


class DualMaskConv2d(_DualMask, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.routed_weight(), self.bias)


class DualMaskLinear(_DualMask, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.routed_weight(), self.bias)


BASE_CLASS = {DualMaskConv2d: nn.Conv2d, DualMaskLinear: nn.Linear}


def dual_mask_copy(layer: nn.Module, k_clean: int, k_adv: int, overlap: str, learned: bool) -> nn.Module:
    """The layer as a dual-mask layer sharing its Parameters (both masks all-ones until set)."""
    cls = DualMaskConv2d if isinstance(layer, nn.Conv2d) else DualMaskLinear
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    new._init_dual(k_clean, k_adv, overlap, learned)
    return new


def initial_scores(layer: nn.Module, source: str, generator: torch.Generator):
    """(s_clean, s_adv) for ``random`` / ``magnitude`` / ``learned`` (see the module docstring)."""
    w = layer.weight.detach()
    if source == "random":
        return (torch.rand(w.shape, generator=generator).to(w.device),
                torch.rand(w.shape, generator=generator).to(w.device))
    magnitude = w.abs()
    if source == "learned":
        fan_in = w[0].numel()
        magnitude = magnitude * math.sqrt(6.0 / fan_in) / magnitude.max().clamp_min(1e-12)
    return magnitude, magnitude.clone()
