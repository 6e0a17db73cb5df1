"""Training that goes wrong stops well: divergence (NaN/inf or exploding loss) and catastrophic overfitting; a
model stuck at chance level is flagged (``chance_level``), not stopped.

Divergence. The trainer accumulates ``loss · n`` on the device and reads it only where it syncs anyway (every
step checkpoint, ``train.checkpoint_every_steps``, and the end of each epoch), so the step loop gains no host
sync. A NaN or inf loss poisons that sum, and its mean is checked there, together with the finiteness of every
parameter and buffer (one sync). Training has diverged when

    the mean loss since the epoch began is not finite,  or  > train.max_loss_factor · ln(classes)  (0: off),
    or a parameter/buffer is not finite.

ln(classes) is the loss of a uniform guess, so the default factor 50 (about 115 for 10 classes) means logits that
are huge and wrong, which SGD does not come back from. The run then stops *before* the check's checkpoint is
written, so ``checkpoints/last.json`` still holds the last good state; ``run.json`` gets status ``diverged`` with
the epoch and step, and the CLI prints one line and exits 2 (``TrainingStopped`` is a ``UserError``).

Catastrophic overfitting (the FGSM-AT failure, Wong et al. 2020: within an epoch, PGD robust accuracy collapses
towards 0 while the training attack's accuracy stays high). Per validated epoch of an adversarial objective:

    sudden drop:  max over earlier epochs of val_robust_acc − val_robust_acc  >  train.overfit_drop
    collapse:     train_adv_acc ≥ 0.3  and  val_robust_acc < 0.25 · train_adv_acc

A flagged epoch carries ``overfit`` (a sentence) in ``metrics.jsonl``, a warning on stderr and ``overfit`` in
``run.json``; with ``train.on_overfit=stop`` the run stops there (status ``overfit``, exit 2) and ``best`` holds the
model from before the collapse. Robust overfitting in the slow sense (Rice et al. 2020) is left to ``best``.
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch

from ..errors import UserError
from ..runs.logger import write_status

COLLAPSE_MIN_TRAIN_ADV = 0.3  # the training attack must be beaten clearly before a val collapse means anything
COLLAPSE_RATIO = 0.25  # val robust below a quarter of the training attack's accuracy
CHANCE_MARGIN = 0.02  # val clean accuracy at most 1/classes + 2 points: no better than a constant guess, up to noise


class TrainingStopped(UserError):
    """A run stopped on purpose (divergence, or catastrophic overfitting with ``train.on_overfit=stop``)."""


def divergence(acc: list[float], num_classes: int, max_loss_factor: float) -> str | None:
    """Why the accumulated ``[loss·n, n, ...]`` shows divergence, or None. Pure: unit-testable."""
    loss_sum, seen = acc[0], acc[1]
    if not seen:
        return None
    mean = loss_sum / seen
    if not math.isfinite(mean):
        return f"the training loss is {mean}"
    limit = max_loss_factor * math.log(max(num_classes, 2))
    if max_loss_factor > 0 and mean > limit:
        return (f"the mean training loss is {mean:.4g}, above train.max_loss_factor × ln(classes) = {limit:.4g} "
                f"(a uniform guess scores {math.log(max(num_classes, 2)):.3g})")
    return None


def nonfinite_tensor(model: torch.nn.Module) -> str | None:
    """Name of the first parameter or buffer holding NaN/inf, or None; one host sync for the whole model."""
    named = [(k, v) for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()]
    if not named:
        return None
    ok = torch.stack([torch.isfinite(v).all() for _, v in named]).cpu()
    if bool(ok.all()):
        return None
    return named[int((~ok).nonzero()[0])][0]


def overfit(row: dict, history: list[dict], drop: float) -> str | None:
    """A sentence if epoch ``row`` shows catastrophic overfitting given the earlier rows ``history``, else None."""
    cur, train_adv = row.get("val_robust_acc"), row.get("train_adv_acc")
    if cur is None or train_adv is None:  # not validated this epoch, or no training attack (standard training)
        return None
    earlier = [(r["val_robust_acc"], r["epoch"]) for r in history if r.get("val_robust_acc") is not None]
    attack = row.get("val_attack", "the validation attack")
    if earlier:
        best, best_epoch = max(earlier, key=lambda p: (p[0], -p[1]))
        if best - cur > drop:
            return (f"catastrophic overfitting suspected at epoch {row['epoch'] + 1}: val robust accuracy "
                    f"({attack}) fell from {best:.1%} (epoch {best_epoch + 1}) to {cur:.1%}, more than "
                    f"train.overfit_drop = {drop:.0%}")
    if train_adv >= COLLAPSE_MIN_TRAIN_ADV and cur < COLLAPSE_RATIO * train_adv:
        return (f"catastrophic overfitting suspected at epoch {row['epoch'] + 1}: val robust accuracy ({attack}) "
                f"is {cur:.1%} while the training attack's accuracy is {train_adv:.1%}: the model has learned "
                "to beat its training attack only")
    return None


def chance_level(row: dict, num_classes: int) -> str | None:
    """A sentence if the validated epoch ``row`` classifies clean points no better than a constant guess, else
    None. Measured on Fashion-MNIST: a GraSP ticket of the BN-free SmallCNN starts with logits ~4,000× the dense
    network's, its first SGD steps kill every ReLU, and the loss then sits at ln(classes) below the divergence
    limit; this is what tells the user. A once-for-all model is validated at λ = 1, so its accurate end (λ = 0,
    ``val_clean_acc_lam0``) is checked too: SMART with ``ofa.mask_source=awt`` on that SmallCNN trained a robust
    expert while its clean expert sat at 10% for every epoch."""
    guess = 1 / max(num_classes, 2)
    for key, what in (("val_clean_acc", "the model"), ("val_clean_acc_lam0", "the accurate end (λ = 0)")):
        clean = row.get(key)
        if clean is not None and clean <= guess + CHANCE_MARGIN:
            return (f"{what} is at chance level at epoch {row['epoch'] + 1}: val clean accuracy {clean:.1%} with "
                    f"{num_classes} classes (a constant guess scores {guess:.1%}); its training is not learning "
                    "(dead ReLUs after an exploding first step, or a path whose weights are too small to carry the "
                    "signal in a network without BN, are the usual causes: lower train.lr or check the ticket's "
                    "or expert's initial outputs)")
    return None


class TrainingGuard:
    """The trainer's two checks, bound to one run folder (see the module docstring)."""

    def __init__(self, run_dir: str, train_cfg, num_classes: int, model: torch.nn.Module, writes: bool = True):
        self.run_dir, self.cfg, self.num_classes, self.model = run_dir, train_cfg, num_classes, model
        self.writes = writes  # False on all but one process of a distributed run: one writes run.json

    def _status(self, **fields) -> None:
        if self.writes:
            write_status(self.run_dir, **fields)

    def check(self, acc: list[float], epoch: int, step: int) -> None:
        """Call where ``acc`` was read anyway, before writing a checkpoint: raises ``TrainingStopped`` if diverged."""
        reason = divergence(acc, self.num_classes, self.cfg.max_loss_factor)
        if reason is None:
            bad = nonfinite_tensor(self.model)
            reason = None if bad is None else f"the model's {bad} holds NaN/inf"
        if reason is None:
            return
        where = f"epoch {epoch + 1}, step {step}"
        self._status(status="diverged", diverged_at={"epoch": epoch, "step": step}, reason=reason)
        raise TrainingStopped(f"training diverged ({where}): {reason}; stopped before saving this state, "
                              f"{self._last_good()}; lower train.lr (it is {self.cfg.lr}) and start a new run")

    def after_validation(self, row: dict, history: list[dict]) -> bool:
        """Flag catastrophic overfitting in ``row`` (before it is logged); True if the run must stop now. A model
        at chance level is flagged too (``row["chance"]``, run.json, stderr) but never stopped: it is a result."""
        chance = chance_level(row, self.num_classes)
        if chance is not None:
            row["chance"] = chance
            self._status(chance={"epoch": row["epoch"], "message": chance})
            if self.writes:
                print(f"warning: {chance}", file=sys.stderr, flush=True)
        message = overfit(row, history, self.cfg.overfit_drop)
        if message is None:
            return False
        row["overfit"] = message
        self._status(overfit={"epoch": row["epoch"], "message": message})
        if self.writes:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        return self.cfg.on_overfit == "stop"

    def stop_overfit(self, row: dict) -> None:
        self._status(status="overfit", stopped_at={"epoch": row["epoch"]})
        raise TrainingStopped(f"{row['overfit']}; stopped (train.on_overfit=stop) without saving this epoch as "
                              f"'last'; {self._last_good()}; the best checkpoint is from before the collapse")

    def _last_good(self) -> str:
        handle = os.path.join(self.run_dir, "checkpoints", "last.json")
        try:
            with open(handle) as fh:
                meta = json.load(fh)
            return f"the last good state is {handle} (saved after {meta['epoch']} epoch(s) + {meta['step']} step(s))"
        except (OSError, ValueError, KeyError, TypeError):
            return "no checkpoint had been written yet"
