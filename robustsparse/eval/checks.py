"""Sanity flags that explain themselves (after AutoAttack's ``checks.py``).

Each check returns a list of warning strings; an empty list means nothing suspicious was seen. They look for the
usual signs that a robust accuracy is inflated by gradient masking or a broken model wrapper rather than by real
robustness. None of them proves masking; each says what was seen and what it usually means.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks.base import attack_mode


@torch.no_grad()
def check_randomness(model, x: torch.Tensor) -> list[str]:
    with attack_mode(model):
        a, b = model(x), model(x)
    if not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        return ["randomness: two forward passes of the same input in eval mode differ. Gradient attacks on a "
                "randomised model need EoT; accuracies below may overestimate robustness."]
    return []


@torch.no_grad()
def check_softmax_output(model, x: torch.Tensor) -> list[str]:
    with attack_mode(model):
        out = model(x)
    if bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones(len(out), device=out.device), atol=1e-4):
        return ["softmax output: the model's outputs look like probabilities, not logits. Cross-entropy attacks "
                "then see vanishing gradients; return logits from the model."]
    return []


def check_zero_gradients(model, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    with attack_mode(model):
        x_req = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_req), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_req)
    zero = (grad.flatten(1).abs().max(dim=1).values == 0)
    if bool(zero.any()):
        frac = zero.float().mean().item()
        return [f"zero gradients: {frac:.1%} of the checked points have an input gradient that is exactly zero. "
                "Gradient-based attacks cannot move them; their robustness may be an artefact (gradient masking)."]
    return []


def check_black_box_beats_white_box(accuracy_before_square: float, accuracy_after_square: float,
                                    n: int) -> list[str]:
    if accuracy_after_square < accuracy_before_square - 1e-9:
        fooled = round((accuracy_before_square - accuracy_after_square) * n)
        return [f"black box beats white box: Square (score-based) fooled {fooled} point(s) that APGD-CE, APGD-T "
                "and FAB-T could not. The white-box gradients may be masked or obfuscated."]
    return []


def check_pgd_beats_autoattack(pgd: dict[str, float], aa: float) -> list[str]:
    out = []
    for name, acc in pgd.items():
        if acc < aa - 1e-9:
            out.append(f"attack inconsistency: {name} ({acc:.2%}) is stronger than AutoAttack ({aa:.2%}). "
                       "AutoAttack should not be weaker than a plain PGD; check the model for randomness or "
                       "input-dependent gradient masking.")
    return out


def check_few_classes(num_classes: int) -> list[str]:
    if num_classes < 4:
        return [f"few classes: with {num_classes} classes the targeted attacks use {num_classes - 1} target(s); "
                "AutoAttack's standard version assumes at least 4 classes (see its 'too few classes' flag)."]
    return []
