"""The dense objectives.

    standard : L = CE(f(x), y)
    pgd_at   : L = CE(f(x*), y),  x* = PGD-k(x)                                         (Madry et al., 2018)
    trades   : L = CE(f(x), y) + β · KL(softmax f(x) ‖ softmax f(x*)),  x* = KL-PGD-k(x) (Zhang et al., 2019)

trades makes the reference's three train-mode forwards, f(x) for the CE, f(x*), then f(x) again for the KL
target (``trades_loss``; not detached, so the gradient flows through both), so BN running statistics get the
clean batch twice per step as in the reference. ``train.trades_forwards=2`` reuses the first f(x) as the KL
target: in train mode BN normalises with the batch's own statistics, so the two f(x) are equal and loss and
gradients are the same; only the running statistics (and one forward's cost) differ.
"""
from __future__ import annotations

import torch.nn.functional as F

from ...attacks.trades import TradesKL
from ...config import RunConfig
from .base import Objective, StepOutput, _count, register_objective, training_pgd


@register_objective("standard")
def standard(model, cfg: RunConfig):
    def step(x, y):
        logits = model(x)
        return StepOutput(F.cross_entropy(logits, y), correct_clean=_count(logits.detach(), y))
    return Objective(step, selects_on="val_clean_acc")  # no attack in training: best = clean accuracy


@register_objective("pgd_at")
def pgd_at(model, cfg: RunConfig):
    attack = training_pgd(model, cfg)

    def step(x, y):
        x_adv = attack(x, y)
        logits = model(x_adv)
        return StepOutput(F.cross_entropy(logits, y), correct_adv=_count(logits.detach(), y))
    return step


@register_objective("trades")
def trades(model, cfg: RunConfig):
    a = cfg.attack
    attack = TradesKL(model, a.eps, steps=a.steps, alpha=cfg.train_alpha, clamp_start=a.trades_clamp_start)
    beta, forwards = cfg.train.trades_beta, cfg.train.trades_forwards

    def step(x, y):
        x_adv = attack(x, y)
        logits_clean, logits_adv = model(x), model(x_adv)
        target = model(x) if forwards == 3 else logits_clean
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(target, dim=1), reduction="batchmean")
        loss = F.cross_entropy(logits_clean, y) + beta * robust
        return StepOutput(loss, correct_clean=_count(logits_clean.detach(), y),
                          correct_adv=_count(logits_adv.detach(), y))
    return step
