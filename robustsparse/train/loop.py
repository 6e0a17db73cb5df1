"""The one epoch/step loop, shared by the trainer, HYDRA's score stage and ``bench``.

Randomness is a pure function of (seed, epoch, step), so resuming at any step boundary reproduces the
uninterrupted run bit for bit. Per step, in this order (tests/test_kill_anywhere.py compares runs bit for bit, and
old checkpoints resume only if it never changes):

    kill check → torch.manual_seed(rank seed of step_seed(seed, e, s)) → batch slice of epoch e's permutation
    → augmentation generator seeded with step_seed(seed, e, s) → augment → shard (DDP) → LR → engine.step

The permutation of epoch e is drawn from its own generator seeded with ``step_seed(seed, e, -1)``. Losses and
counts accumulate on the device (``StepCounts``) and are read only where the caller syncs anyway.
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Iterator

import torch

from ..data import augment

KILL_AT_STEP_ENV = "ROBUSTSPARSE_KILL_AT_STEP"  # fault injection for resume tests: SIGKILL self at this global step


def step_seed(seed: int, epoch: int, step: int) -> int:
    return ((seed * 1_000_003 + epoch) * 100_003 + step) % (2**63 - 1)


def kill_step() -> int:
    """The global step at which ``ROBUSTSPARSE_KILL_AT_STEP`` asks this process to SIGKILL itself (-1: never)."""
    return int(os.environ.get(KILL_AT_STEP_ENV, "-1"))


class StepCounts:
    """The epoch's running sums on the device, read once where the caller syncs: loss·n, n, clean correct, adv
    correct, and the numbers of points each count is over (an objective may attack only part of the batch).

    ``as_list()`` is what checkpoints store as ``epoch_sums["acc"]``. A 4-slot list from a checkpoint written
    before the denominators existed resumes with each count over all n points if it counted any (the methods of
    that time attacked the whole batch, except the once-for-all ones, whose adversarial accuracy was not logged)."""
    SLOTS = 6

    def __init__(self, device, saved: list[float] | None = None):
        self.acc = torch.zeros(self.SLOTS, device=device, dtype=torch.float64)
        if saved:
            if len(saved) == 4:
                loss_sum, seen, clean_ok, adv_ok = saved
                saved = [loss_sum, seen, clean_ok, adv_ok, seen if clean_ok else 0.0, seen if adv_ok else 0.0]
            self.acc += torch.tensor(saved, device=device, dtype=torch.float64)

    def add(self, out, n: int) -> None:
        acc = self.acc
        acc[0] += out.loss.detach() * n
        acc[1] += n
        if out.correct_clean is not None:
            acc[2] += out.correct_clean
            acc[4] += n if out.n_clean is None else out.n_clean
        if out.correct_adv is not None:
            acc[3] += out.correct_adv
            acc[5] += n if out.n_adv is None else out.n_adv

    def as_list(self, engine=None) -> list[float]:
        return (self.acc if engine is None else engine.sum_over_ranks(self.acc)).tolist()

    @staticmethod
    def row(totals: list[float]) -> dict:
        """The epoch's metrics: train loss, and each accuracy that was counted, over its own points."""
        loss_sum, seen, clean_ok, adv_ok, clean_n, adv_n = totals
        row = {"train_loss": loss_sum / seen}
        if clean_n:
            row["train_clean_acc"] = clean_ok / clean_n
        if adv_n:
            row["train_adv_acc"] = adv_ok / adv_n
        return row


def seeded_batches(x: torch.Tensor, y: torch.Tensor, seed: int, epoch: int, first: int, steps_per_epoch: int,
                   batch: int, crop_padding: int = 0, flip: bool = False, engine=None,
                   kill_at: int = -1) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield (step, global step, xb, yb) for steps ``first``..``steps_per_epoch``-1 of ``epoch``, in the order
    of the module docstring; ``engine`` (optional) gives the rank seed and this rank's shard."""
    device = x.device
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(step_seed(seed, epoch, -1))).to(device)
    for step in range(first, steps_per_epoch):
        global_step = epoch * steps_per_epoch + step
        if global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        s = step_seed(seed, epoch, step)
        torch.manual_seed(s if engine is None else engine.rank_seed(s))  # attack random starts, dropout
        idx = perm[step * batch:(step + 1) * batch]
        gen = torch.Generator(device=device).manual_seed(s)
        xb = augment(x[idx], crop_padding, flip, generator=gen)
        yb = y[idx]
        if engine is not None:
            xb, yb = engine.shard(xb), engine.shard(yb)  # this rank's slice of the global batch (DDP)
        yield step, global_step, xb, yb


def run_steps(batches, engine, objective, optimizer, counts: StepCounts, lr_of: Callable[[int], float],
              after_step: Callable[[], None] | None = None, bar=None, every: int = 0,
              on_checkpoint: Callable[[int], None] | None = None, steps_per_epoch: int = 0) -> float | None:
    """Run the steps ``batches`` yields: LR from ``lr_of(global step)``, ``engine.step``, ``after_step`` (e.g.
    HYDRA's mask update), the counts, and ``on_checkpoint(next step)`` every ``every`` global steps except at the
    epoch's end (the caller's epoch-end checkpoint covers it). Returns the last LR (None if no step ran)."""
    lr = None
    for step, global_step, xb, yb in batches:
        lr = lr_of(global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = engine.step(objective, optimizer, xb, yb)
        if after_step is not None:
            after_step()
        counts.add(out, len(yb))
        if bar is not None:
            bar.update(1)
        if every and on_checkpoint is not None and (global_step + 1) % every == 0 and step + 1 < steps_per_epoch:
            on_checkpoint(step + 1)
    return lr
