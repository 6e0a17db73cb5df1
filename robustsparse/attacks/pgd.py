"""PGD (Madry et al., 2018) under L∞ or L2, with random start, restarts and a per-sample worst case.

One run of k steps:
    x⁰ = x + U(B_ε)  (or x),   xᵗ⁺¹ = clip_[0,1]( x + Π_ε( xᵗ + α · s(∇ₓ CE(f(xᵗ), y)) − x ) )
with s = sign for L∞ and s(g) = g/‖g‖₂ for L2. The loss is summed over the batch, so each sample's step does not
depend on the batch size. With ``restarts`` > 1 each sample keeps the first restart's point that fools the model,
else the last restart's point: the accuracy under the returned batch is the pointwise worst case over restarts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attack, project, random_start, steepest_step


class PGD(Attack):
    """``PGD(model, eps, steps=20, alpha=None, norm="Linf", restarts=1, random_start=True)(x, y) -> x_adv``.

    ``alpha`` defaults to ε/4 (the common PGD-20 convention: 2/255 at ε = 8/255).
    """

    name = "PGD"

    def __init__(self, model, eps: float, steps: int = 20, alpha: float | None = None, norm: str = "Linf",
                 restarts: int = 1, random_start: bool = True):
        super().__init__(model, eps, norm)
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
        self.steps = int(steps)
        self.alpha = self.eps / 4 if alpha is None else float(alpha)
        self.restarts = int(restarts)
        self.random_start = random_start

    def run_once(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = random_start(x, self.eps, self.norm) if self.random_start else x.clone()
        loss_fn = lambda logits: F.cross_entropy(logits, y, reduction="sum")  # noqa: E731
        for _ in range(self.steps):
            grad = self.input_grad(x_adv, loss_fn)
            x_adv = steepest_step(x_adv, grad, self.alpha, self.norm)
            x_adv = (x + project(x_adv - x, self.eps, self.norm)).clamp(0.0, 1.0)
        return x_adv

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        best = self.run_once(x, y)
        if self.restarts == 1:
            return best
        fooled = self.model(best).argmax(1) != y
        for _ in range(self.restarts - 1):
            if bool(fooled.all()):
                break
            candidate = self.run_once(x, y)
            take = ~fooled
            best = torch.where(take.view(-1, 1, 1, 1), candidate, best)
            fooled = self.model(best).argmax(1) != y
        return best

    def describe(self) -> str:
        norm = "L∞" if self.norm == "Linf" else "L2"
        start = "random start" if self.random_start else "no random start"
        return (f"PGD-{self.steps} {norm} eps={self.eps:.4g} alpha={self.alpha:.4g} "
                f"restarts={self.restarts} ({start})")
