"""TRADES inner maximisation (Zhang et al., 2019): KL-PGD around the clean prediction.

    x⁰ = x + 0.001·N(0, I),   xᵗ⁺¹ = clip_[0,1]( x + Π_ε( xᵗ + α · sign(∇ₓ KL(f(x) ‖ f(xᵗ))) − x ) )

exactly as the reference (``yaodongyu/TRADES`` ``trades_loss``): the start x⁰ is NOT clipped, so the first gradient
may be taken slightly outside [0, 1]; every later point is clipped. ``clamp_start=True`` (config
``attack.trades_clamp_start``) is our earlier variant, x⁰ = clip_[0,1](x + 0.001·N(0, I)), which keeps every point
the model sees inside the image domain. Where many pixels are exactly 0 or 1 (digits, Fashion-MNIST) the two
differ: the KL gradient at x is ~0, so the first step's sign is set by the noise, and clipping the noise changes
it (docs/reference-differences.md measures the x_adv difference).

KL(p ‖ q) = Σ p log(p/q) with p = softmax(f(x)) held fixed, summed over the batch (the reference code's
``KLDivLoss(size_average=False)``). As in the reference, the attack runs in eval mode; the TRADES loss itself
(``train/objectives/standard.py``) is then computed in train mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attack, project


class TradesKL(Attack):
    """``TradesKL(model, eps, steps=10, alpha=None)(x, y) -> x_adv``; ``y`` is unused (the attack is label-free).

    ``alpha`` defaults to ε/4 (TRADES' 0.007 at ε = 0.031 is ≈ ε/4.4). ``clamp_start``: clip the noisy start to
    [0, 1] before the first gradient (default False: the reference's order, see the module docstring).
    """

    name = "TRADES-KL"

    def __init__(self, model, eps: float, steps: int = 10, alpha: float | None = None,
                 clamp_start: bool = False):
        super().__init__(model, eps, "Linf")
        self.clamp_start = bool(clamp_start)
        self.steps = int(steps)
        self.alpha = self.eps / 4 if alpha is None else float(alpha)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p_clean = F.softmax(self.model(x), dim=1)
        x_adv = x + 0.001 * torch.randn_like(x)
        if self.clamp_start:
            x_adv = x_adv.clamp(0.0, 1.0)
        loss_fn = lambda logits: F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")  # noqa: E731
        for _ in range(self.steps):
            grad = self.input_grad(x_adv, loss_fn)
            x_adv = x_adv + self.alpha * grad.sign()
            x_adv = (x + project(x_adv - x, self.eps, "Linf")).clamp(0.0, 1.0)
        return x_adv

    def describe(self) -> str:
        start = ", clamped start" if self.clamp_start else ""
        return f"TRADES-KL-PGD-{self.steps} L∞ eps={self.eps:.4g} alpha={self.alpha:.4g}{start}"
