"""Learning-rate schedules as pure functions of the step, so a resumed run needs only the step counter.

    cosine    : η(t) = η₀ · ½(1 + cos πt)
    onecycle  : linear 0 → η₀ over the first 40% of training, then linear η₀ → 0 (fast-AT / airbench style)
    multistep : η₀ · 0.1^(number of milestones passed), milestones as fractions of training
    constant  : η₀
with t ∈ [0, 1] the fraction of training done after an optional linear warm-up (``warmup_epochs``).
"""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, base_lr: float, schedule: str, warmup_steps: int = 0,
          milestones: list[float] | tuple = (0.5, 0.75)) -> float:
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "onecycle":
        return base_lr * (t / 0.4 if t < 0.4 else max(0.0, (1 - t) / 0.6))
    if schedule == "multistep":
        return base_lr * 0.1 ** sum(t >= m for m in milestones)
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown schedule {schedule!r}")
