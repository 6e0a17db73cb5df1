"""Training objectives, one registry: a new objective is one function and one decorator line.

    standard : L = CE(f(x), y)
    pgd_at   : L = CE(f(x*), y),  x* = PGD-k(x)                                         (Madry et al., 2018)
    trades   : L = CE(f(x), y) + β · KL(softmax f(x) ‖ softmax f(x*)),  x* = KL-PGD-k(x) (Zhang et al., 2019)
    fgsm_at  : L = CE(f(x*), y),  x* = FGSM with random start, α = 1.25ε  (Wong et al., 2020; in fgsm_at.py)

Attacks run in eval mode with parameter gradients off (attacks/base.py); the loss is then computed in the mode the
trainer set (train). Accuracy counts stay on the device as tensors so the step never synchronises with the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ...attacks.pgd import PGD
from ...attacks.trades import TradesKL
from ...config import RunConfig

OBJECTIVES: dict[str, Callable] = {}


def register_objective(name: str):
    def wrap(factory):
        OBJECTIVES[name] = factory
        return factory
    return wrap


@dataclass
class StepOutput:
    loss: torch.Tensor
    correct_clean: torch.Tensor | None = None  # number of training points classified correctly, clean
    correct_adv: torch.Tensor | None = None  # ... under the training attack


def _count(logits, y):
    return (logits.argmax(1) == y).sum()


@register_objective("standard")
def standard(model, cfg: RunConfig):
    def step(x, y):
        logits = model(x)
        return StepOutput(F.cross_entropy(logits, y), correct_clean=_count(logits.detach(), y))
    return step


@register_objective("pgd_at")
def pgd_at(model, cfg: RunConfig):
    a = cfg.attack
    attack = PGD(model, a.eps, steps=a.steps, alpha=cfg.train_alpha, norm=a.norm, random_start=a.random_start)

    def step(x, y):
        x_adv = attack(x, y)
        logits = model(x_adv)
        return StepOutput(F.cross_entropy(logits, y), correct_adv=_count(logits.detach(), y))
    return step


@register_objective("trades")
def trades(model, cfg: RunConfig):
    a = cfg.attack
    attack = TradesKL(model, a.eps, steps=a.steps, alpha=cfg.train_alpha)
    beta = cfg.train.trades_beta

    def step(x, y):
        x_adv = attack(x, y)
        logits_clean, logits_adv = model(x), model(x_adv)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
        loss = F.cross_entropy(logits_clean, y) + beta * robust
        return StepOutput(loss, correct_clean=_count(logits_clean.detach(), y),
                          correct_adv=_count(logits_adv.detach(), y))
    return step


def build_objective(model, cfg: RunConfig):
    return OBJECTIVES[cfg.train.method](model, cfg)


from . import fgsm_at  # noqa: E402,F401  one file per objective; importing it registers it
from ... import ofa as _ofa  # noqa: E402,F401  once-for-all objectives: oat, float, smart (robustsparse/ofa/)
