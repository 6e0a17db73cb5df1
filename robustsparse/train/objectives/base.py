"""The objective registry: a new objective is one function and one decorator line.

An objective factory ``f(model, cfg)`` returns either the step ``(x, y) -> StepOutput`` or an ``Objective``, which
adds the hooks the trainer's validation calls (the module to validate, extra validation numbers, the metric that
picks ``best``). The trainer knows objectives only through these hooks and never names a method.

    standard.py  standard, pgd_at, trades          fgsm_at.py  fast AT (FGSM with random start)
    ofa.py       smart, oat, float: once-for-all objectives (their models live in robustsparse/ofa/)

Attacks run in eval mode with parameter gradients off (attacks/base.py); the loss is then computed in the mode the
trainer set (train). Accuracy counts stay on the device as tensors so the step never synchronises with the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...attacks.pgd import PGD
from ...config import RunConfig

OBJECTIVES: dict[str, Callable] = {}


def register_objective(name: str):
    def wrap(factory):
        OBJECTIVES[name] = factory
        return factory
    return wrap


@dataclass
class StepOutput:
    """One step's loss and accuracy counts. A count is over ``n_clean`` / ``n_adv`` points (None: the whole batch),
    so an objective that attacks only part of the batch (smart, oat, float) reports its own denominator."""
    loss: torch.Tensor
    correct_clean: torch.Tensor | None = None  # number of training points classified correctly, clean
    correct_adv: torch.Tensor | None = None  # ... under the training attack
    n_clean: int | None = None
    n_adv: int | None = None


def _same_model(model: nn.Module) -> nn.Module:
    return model


def _no_extra(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    return {}


@dataclass
class Objective:
    """The step plus the trainer's validation hooks (defaults: validate the model itself, nothing extra, and keep
    the checkpoint with the best validation robust accuracy)."""
    step: Callable[[torch.Tensor, torch.Tensor], StepOutput]
    validation_model: Callable[[nn.Module], nn.Module] = _same_model
    extra_validation: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict] = _no_extra
    selects_on: str = "val_robust_acc"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        return self.step(x, y)


def training_pgd(model: nn.Module, cfg: RunConfig) -> PGD:
    """The training attack of every PGD-based objective: ``attack.*`` with the training step size."""
    a = cfg.attack
    return PGD(model, a.eps, steps=a.steps, alpha=cfg.train_alpha, norm=a.norm, random_start=a.random_start)


def _count(logits, y):
    return (logits.argmax(1) == y).sum()


def build_objective(model, cfg: RunConfig) -> Objective:
    made = OBJECTIVES[cfg.train.method](model, cfg)
    return made if isinstance(made, Objective) else Objective(made)
