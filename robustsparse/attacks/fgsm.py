"""FGSM (Goodfellow et al., 2015), optionally with a random start (Wong et al., 2020, "fast AT").

    x_adv = clip_[0,1]( Π_ε( x₀ + α · sign(∇ₓ CE(f(x₀), y)) ) ),  x₀ = x (or a uniform random point of the ε-ball)

α defaults to ε (plain FGSM); fast AT uses α = 1.25 ε with ``random_start=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attack, project, random_start


class FGSM(Attack):
    """Single-step L∞ attack. ``FGSM(model, eps=8/255)(x, y) -> x_adv``."""

    name = "FGSM"

    def __init__(self, model, eps: float, alpha: float | None = None, random_start: bool = False):
        super().__init__(model, eps, "Linf")
        self.alpha = self.eps if alpha is None else float(alpha)
        self.random_start = random_start

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x0 = random_start(x, self.eps, "Linf") if self.random_start else x
        grad = self.input_grad(x0, lambda logits: F.cross_entropy(logits, y, reduction="sum"))
        x_adv = x0 + self.alpha * grad.sign()
        return (x + project(x_adv - x, self.eps, "Linf")).clamp(0.0, 1.0)

    def describe(self) -> str:
        rs = ", random start" if self.random_start else ""
        return f"FGSM L∞ eps={self.eps:.4g} alpha={self.alpha:.4g}{rs}"
