"""The PGD-AT loop a skilled PyTorch user writes without this library: the baseline ``robustsparse bench`` must beat.

What it does right (and the textbook loop in `robustsparse.bench` does not):

* the data are one tensor on the device; each epoch draws one permutation there and slices batches from it (no
  DataLoader, no host copies);
* the attack differentiates w.r.t. the input only, ``torch.autograd.grad(loss, x_adv)``: autograd then runs only
  the nodes on the path to ``x_adv``, so no weight gradient is computed in the k attack backwards (for a conv layer
  that half of the backward costs about as much as the input gradient);
* SGD with momentum 0.9 and weight decay 5e-4 under a per-step cosine learning-rate schedule
  (``CosineAnnealingLR``), ``zero_grad(set_to_none=True)``, and no host synchronisation per step (the running loss
  stays on the device).

It runs fp32 and contiguous (NCHW): what a careful user gets without mixed precision or compilation. The attack is
the same L∞ PGD-k as ours (uniform random start, sign step α, projection onto the ε-ball and [0, 1]), with the loss
averaged over the batch (ours sums it: the sign step is the same).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def skilled_pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """L∞ PGD-k from a uniform random start; gradients w.r.t. the input only. ``model`` must be in eval mode."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


class SkilledLoop:
    """``SkilledLoop(model, x, y, batch, steps, eps, lr, total_steps).run(iters)``: ``iters`` PGD-AT steps."""

    def __init__(self, model, x, y, batch: int, steps: int, eps: float, lr: float, total_steps: int,
                 device: torch.device, seed: int = 0):
        self.model, self.batch, self.steps, self.eps = model, batch, steps, eps
        self.alpha = 2.5 * eps / steps
        self.x, self.y = x.to(device), y.to(device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, total_steps))
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.per_epoch = len(self.y) // batch
        self.step_count = 0
        self.loss_sum = torch.zeros((), device=device)
        self.losses: list[torch.Tensor] = []  # per step, on the device (read by tests, never in the loop)

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        x_adv = skilled_pgd(self.model, xb, yb, self.eps, self.alpha, self.steps)
        self.model.train()
        loss = F.cross_entropy(self.model(x_adv), yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def run(self, iters: int) -> None:
        for _ in range(iters):
            step = self.step_count % self.per_epoch
            if step == 0:
                self.perm = torch.randperm(len(self.y), device=self.y.device, generator=self.gen)
            idx = self.perm[step * self.batch:(step + 1) * self.batch]
            loss = self.train_step(self.x[idx], self.y[idx])
            self.loss_sum += loss
            self.losses.append(loss)
            self.step_count += 1
