"""``fgsm_at``: fast adversarial training, FGSM with a random start (Wong, Rice & Kolter, ICLR 2020).

    δ₀ ~ U(B_ε),   x* = clip_[0,1]( x + Π_ε( δ₀ + α · sign(∇ₓ CE(f(x + δ₀), y)) ) ),  L = CE(f(x*), y)

α defaults to 1.25 ε (the paper's choice; ``attack.alpha`` overrides it), and ``attack.random_start=false`` gives
plain FGSM-AT. L∞ only. Fast AT is known to overfit catastrophically at large ε or α (PGD robust accuracy falls
to ~0 within an epoch while FGSM accuracy stays high); ``train/guards.py`` detects that per epoch.
"""
from __future__ import annotations

import torch.nn.functional as F

from ...attacks.fgsm import FGSM
from ...config import RunConfig
from .base import StepOutput, _count, register_objective

FAST_AT_ALPHA = 1.25  # × eps


@register_objective("fgsm_at")
def fgsm_at(model, cfg: RunConfig):
    a = cfg.attack
    alpha = a.alpha if a.alpha is not None else FAST_AT_ALPHA * a.eps
    attack = FGSM(model, a.eps, alpha=alpha, random_start=a.random_start)

    def step(x, y):
        x_adv = attack(x, y)
        logits = model(x_adv)
        return StepOutput(F.cross_entropy(logits, y), correct_adv=_count(logits.detach(), y))
    return step
