"""SMART: Sparse Mixture Once-for-all Adversarial Training (Kundu et al., ICASSP 2023), as reconstructed in
method-notes §3(b).3 (the RLNet form of the co-authors' code).

One shared weight W_l per split layer and two binary masks: the clean expert computes with W_l ⊙ M_l^c and BN_c,
the adversarial expert with W_l ⊙ M_l^a and BN_a. Layers before ``ofa.split_from`` and the classifier are dense
and shared. Training, per batch of B (half-batch, fixed 0.5/0.5 weights):

    x_c, y_c = x[:B/2], y[:B/2];   x_r, y_r = x[B/2:], y[B/2:]
    x̃   = PGD-k(f(·; W⊙M^a, BN_a), x_r, y_r)                      (eval mode, no parameter grads)
    L   = 0.5 · CE(f(x_c; W⊙M^c, BN_c), y_c) + 0.5 · CE(f(x̃; W⊙M^a, BN_a), y_r)

so each weight gets gradient only from the loss of the expert(s) whose mask holds it. Masks (densities d_c, d_a,
overlap, source) are built as smart_masks.py says; fixed masks are buffers, and the union M^c ∪ M^a is applied
with the library's `apply_mask` (a ``weight_mask`` buffer with its hooks), so weights outside both experts stay
exactly 0 through every optimizer step and save/load. (Learned masks move, so their union is not pinned; weights
outside the current masks are simply unused, and `export` zeroes them.)

λ at inference (``ofa.mix``; method-notes §3(b).3 and §3(f).4):
    switch   λ < 0.5 → the clean expert (W⊙M^c, BN_c), else the adversarial expert (W⊙M^a, BN_a)
    weight   W_λ = W ⊙ ((1−λ)·M^c + λ·M^a), BN_c iff λ < 0.1 (dense support M^c ∪ M^a for 0 < λ < 1)
    logit    log p_λ = log((1−λ)·softmax(z_c) + λ·softmax(z_a)), two sparse forward passes for 0 < λ < 1
At λ ∈ {0, 1} all three are the single expert. `export` returns the registry architecture with the chosen
expert's sparse weights (W⊙M, carried as a `Mask`) and that path's BN: a plain sparse model, bit-identical to the
routed forward, whose non-zero parameters and MACs `sparsity_report` measures exactly.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.dual_bn import DualBatchNorm2d, bn_route, convert_to_dual_bn
from ..sparse.mask import Mask, apply_mask, prunable_parameters, remove_mask
from .base import BN_CLEAN_BELOW, conditioned_layers, register_ofa, replace_module, restoring
from .smart_masks import (BASE_CLASS, _DualMask, dual_mask_copy, expert_masks, initial_scores, keep_count,
                          random_expert_masks)

MIXES = ("switch", "weight", "logit")


def split_layers(model) -> list[str]:
    """Names of the layers that would be split at ``split_from`` = 0 (all conv/linear but the classifier), in
    forward-definition order; ``ofa.split_from = k`` splits names[k:]."""
    return list(conditioned_layers(model))


def dual_layers(model) -> dict[str, _DualMask]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _DualMask)}


def convert(model, options: dict, seed: int):
    convert_to_dual_bn(model)
    names = split_layers(model)
    k = options["split_from"]
    if k >= len(names):
        raise UserError(f"ofa.split_from={k} leaves no layer to split: this model has {len(names)} splittable "
                        f"layers (conv/linear except the classifier), so split_from must be < {len(names)}")
    learned = options["mask_source"] == "learned"
    for name in names[k:]:
        layer = model.get_submodule(name)
        n = layer.weight.numel()
        replace_module(model, name, dual_mask_copy(layer, keep_count(options["density_clean"], n),
                                                   keep_count(options["density_adv"], n), options["overlap"],
                                                   learned))
    # 1 once both experts' masks exist; `awt` masks need training data, so they are found at the first step
    model.register_buffer("smart_masks_ready", torch.tensor(0))
    if options["mask_source"] != "awt":
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        if options["mask_source"] == "random":
            masks = {n: random_expert_masks(m.weight.shape, m.k_clean, m.k_adv, m.overlap, gen)
                     for n, m in dual_layers(model).items()}
            set_expert_masks(model, masks=masks)
            return model
        scores = {n: initial_scores(m, options["mask_source"], gen) for n, m in dual_layers(model).items()}
        set_expert_masks(model, scores, pin_union=not learned)
        if learned:
            with torch.no_grad():
                for name, m in dual_layers(model).items():
                    m.score_clean.copy_(scores[name][0])
                    m.score_adv.copy_(scores[name][1])
    return model


def set_expert_masks(model, scores: dict | None = None, pin_union: bool = True, masks: dict | None = None) -> None:
    """Set both experts' masks, given per layer as (M_c, M_a) or chosen from (s_clean, s_adv) scores; pin their
    union with `apply_mask`."""
    layers = dual_layers(model)
    for name, layer in layers.items():
        if masks is not None:
            layer.set_masks(*(m.to(layer.mask_clean.device) for m in masks[name]))
        else:
            s_c, s_a = scores[name]
            layer.set_masks(*expert_masks(s_c, s_a, layer.k_clean, layer.k_adv, layer.overlap))
    if pin_union:
        union = {}
        by_param = {f"{n}.weight": m for n, m in layers.items()}
        for key, p in prunable_parameters(model).items():
            layer = by_param.get(key)
            union[key] = torch.ones_like(p) if layer is None else torch.maximum(layer.mask_clean, layer.mask_adv)
        apply_mask(model, Mask(union))
    model.smart_masks_ready.fill_(1)


def expert_mask_tensors(model) -> tuple[Mask, Mask]:
    """(M_c, M_a) of the split layers as `Mask` objects keyed by parameter name."""
    layers = dual_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            if layer.learned:
                layer._masks()  # refresh the buffers from the scores
    return (Mask({f"{n}.weight": m.mask_clean for n, m in layers.items()}),
            Mask({f"{n}.weight": m.mask_adv for n, m in layers.items()}))


def mask_iou(model) -> float:
    """|M_c ∩ M_a| / |M_c ∪ M_a| over all split layers (0 for complementary masks)."""
    clean, adv = expert_mask_tensors(model)
    inter = sum(float((clean[k] * adv[k]).sum()) for k in clean)
    union = sum(float(torch.maximum(clean[k], adv[k]).sum()) for k in clean)
    return inter / union if union else 0.0


@contextmanager
def smart_path(model, route):
    """Route every dual-mask layer and dual BN: "clean", "adv" or ("weight", λ) (BN_c iff λ < 0.1)."""
    if not int(model.smart_masks_ready):
        raise RuntimeError("SMART masks are not built yet (mask_source=awt finds them at the first training step)")
    bn = route if isinstance(route, str) else ("clean" if route[1] < BN_CLEAN_BELOW else "adv")
    with restoring(dual_layers(model).values(), "route", route), bn_route(model, bn):
        yield model


def _collapse(model, route) -> nn.Module:
    """A deep copy of ``model`` turned into its plain architecture on one path: weights W ⊙ mask (the exact
    product the routed forward uses), that path's BN, the support carried as a `Mask`."""
    bn = route if isinstance(route, str) else ("clean" if route[1] < BN_CLEAN_BELOW else "adv")
    plain = copy.deepcopy(model)
    remove_mask(plain)
    support = {}
    with torch.no_grad():
        for name, layer in dual_layers(plain).items():
            m = layer.path_mask(route).detach()
            layer.weight.data = layer.weight.data * m
            support[f"{name}.weight"] = (m != 0).float()
            for key in ("mask_clean", "mask_adv"):
                del layer._buffers[key]
            for key in ("score_clean", "score_adv"):
                layer._parameters.pop(key, None)
            for attr in ("k_clean", "k_adv", "overlap", "learned", "route"):
                delattr(layer, attr)
            layer.__class__ = BASE_CLASS[type(layer)]
    for name, dual in [(n, m) for n, m in plain.named_modules() if isinstance(m, DualBatchNorm2d)]:
        replace_module(plain, name, dual.bn_clean if bn == "clean" else dual.bn_adv)
    del plain._buffers["smart_masks_ready"]
    for attr in ("ofa_method", "ofa_options"):
        plain.__dict__.pop(attr, None)
    apply_mask(plain, Mask({k: support.get(k, torch.ones_like(p)) for k, p in prunable_parameters(plain).items()}))
    return plain.eval()


class LogitMixture(nn.Module):
    """log((1−λ)·softmax(z_c) + λ·softmax(z_a)): log-probabilities, so argmax and cross-entropy are the
    mixture's."""

    def __init__(self, clean: nn.Module, adv: nn.Module, lam: float):
        super().__init__()
        self.clean, self.adv, self.lam = clean, adv, float(lam)

    def forward(self, x):
        parts = torch.stack([F.log_softmax(self.clean(x), 1) + math.log(1 - self.lam),
                             F.log_softmax(self.adv(x), 1) + math.log(self.lam)])
        return torch.logsumexp(parts, 0)

    def extra_ops(self, out: torch.Tensor) -> int:
        """Mixing the two softmax outputs: two multiplies and one add per class (the second pass's MACs are
        counted with its layers)."""
        return 3 * out[0].numel()

    def extra_repr(self) -> str:
        return f"lam={self.lam:g}"


def at_lambda(model, lam: float, mix: str | None = None) -> nn.Module:
    mix = mix or model.ofa_options["mix"]
    if mix not in MIXES:
        raise UserError(f"mix must be one of {', '.join(MIXES)}, got {mix!r}")
    if mix == "switch":
        return _collapse(model, "clean" if lam < 0.5 else "adv")
    if lam in (0.0, 1.0):
        return _collapse(model, "clean" if lam == 0 else "adv")
    if mix == "logit":
        clean, adv = _collapse(model, "clean"), _collapse(model, "adv")
        split = set(dual_layers(model))
        for name, layer in adv.named_modules():  # unsplit conv/linear (the classifier at least) are one tensor
            if isinstance(layer, (nn.Conv2d, nn.Linear)) and name not in split:
                shared = clean.get_submodule(name)
                layer.weight, layer.bias = shared.weight, shared.bias
        return LogitMixture(clean, adv, lam).eval()
    return _collapse(model, ("weight", lam))


register_ofa("smart", convert, at_lambda)


def find_ticket_masks(model, cfg, x, y) -> None:
    """``mask_source=awt``: the clean expert from an NTT ticket (clean-point NTK), the adversarial expert from an
    AWT ticket (adversarial-point NTK), both searched from the current θ₀ with the clean BN; only the masks are
    used (the experts share θ₀). Ticket weights rank first, then |θ₀| breaks the ties the overlap needs.
    The searches run inside a training step, so they draw no progress bars of their own (the epoch's bar, or its
    one-line summary under --no-progress, is the progress a user sees)."""
    from ..prune.registry import find_ticket

    dense = _collapse_dense(model)
    scores = {}
    tickets = {}
    for expert, method, density in (("clean", "ntt", cfg.ofa.density_clean), ("adv", "awt", cfg.ofa.density_adv)):
        sub = copy.deepcopy(cfg)
        sub.prune.method, sub.prune.density = method, density
        sub.prune.min_layer_density = min(sub.prune.min_layer_density, density)
        tickets[expert] = find_ticket(dense, sub, x, y, progress=False).mask
    for name, layer in dual_layers(model).items():
        w = layer.weight.detach().abs()
        tie = 0.5 * w / w.max().clamp_min(1e-12)
        key = f"{name}.weight"
        scores[name] = tuple(tickets[e][key].to(w.device) + tie for e in ("clean", "adv"))
    set_expert_masks(model, scores, pin_union=True)


def _collapse_dense(model) -> nn.Module:
    """The plain architecture with the shared (unmasked) weights and the clean BN: θ₀ for a ticket search."""
    saved = {n: (m.mask_clean.clone(), m.mask_adv.clone()) for n, m in dual_layers(model).items()}
    for m in dual_layers(model).values():
        m.set_masks(torch.ones_like(m.mask_clean), torch.ones_like(m.mask_adv))
    model.smart_masks_ready.fill_(1)
    try:
        return _collapse(model, "clean").train()
    finally:
        for n, m in dual_layers(model).items():
            m.set_masks(*saved[n])
        model.smart_masks_ready.fill_(0)
