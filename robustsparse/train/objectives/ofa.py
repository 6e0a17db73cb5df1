"""Once-for-all objectives (the models are in robustsparse/ofa/): each forward runs inside the routing context
that sets the mask, FiLM condition or noise λ and the dual-BN route, then restores it.

    smart : ½ CE(f_clean(x₁), y₁) + ½ CE(f_adv(x₂*), y₂), the batch split in halves between the two experts
    oat   : per sample λ ~ ofa.lambdas, (1 − λ) CE(f_λ(x), y) + λ CE(f_λ(x*), y), the λ = 0 share clean only
    float : ½ CE(f_{λ=0}(x), y) + ½ CE(f_{λ=1}(x₂*), y₂) over the batch, noise resampled every forward

Each returns an ``Objective`` with the validation hooks the trainer calls: the robust end (λ = 1) is what is
validated and selects ``best``, and the clean accuracy of the accurate end (λ = 0) is logged beside it. Counts carry
their own denominators (only part of the batch is attacked), so ``train_adv_acc`` is over the attacked points.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...attacks.base import attack_mode
from ...data import load_split
from ...errors import UserError
from ...ofa import float_noise, oat, smart
from ...ofa.base import at_lambda, ofa_method_of, unwrap
from .base import Objective, StepOutput, register_objective, training_pgd


def validation_model(model: nn.Module) -> nn.Module:
    """What the trainer validates: the robust end (λ = 1) of a conditional model, else the model itself."""
    return model if ofa_method_of(model) is None else at_lambda(model, 1.0)


@torch.no_grad()
def validation_extra(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict:
    """For a conditional model, the clean validation accuracy of its accurate end (λ = 0); else {}."""
    if ofa_method_of(model) is None or not len(y):
        return {}
    clean_end = at_lambda(model, 0.0)
    with attack_mode(clean_end):
        correct = sum(int((clean_end(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(y), batch_size))
    return {"val_clean_acc_lam0": correct / len(y)}


def _ofa_objective(step) -> Objective:
    return Objective(step, validation_model=validation_model, extra_validation=validation_extra)


@register_objective("smart")
def smart_objective(model, cfg):
    inner = unwrap(model)
    attack = training_pgd(model, cfg)

    def step(x, y):
        if not int(inner.smart_masks_ready):
            x_all, y_all = (v.to(x.device) for v in load_split(cfg, "train"))
            smart.find_ticket_masks(inner, cfg, x_all, y_all)
        half = len(x) // 2
        with smart.smart_path(inner, "adv"):
            x_adv = attack(x[half:], y[half:])
            logits_adv = model(x_adv)
        with smart.smart_path(inner, "clean"):
            logits_clean = model(x[:half])
        loss = 0.5 * F.cross_entropy(logits_clean, y[:half]) + 0.5 * F.cross_entropy(logits_adv, y[half:])
        return StepOutput(loss, correct_clean=(logits_clean.detach().argmax(1) == y[:half]).sum(),
                          correct_adv=(logits_adv.detach().argmax(1) == y[half:]).sum(),
                          n_clean=half, n_adv=len(y) - half)
    return _ofa_objective(step)


@register_objective("oat")
def oat_objective(model, cfg):
    inner = unwrap(model)
    attack = training_pgd(model, cfg)
    lambdas = sorted(cfg.ofa.lambdas)
    nonzero = torch.tensor([v for v in lambdas if v > 0])
    if not len(nonzero):
        raise UserError("ofa.lambdas holds only 0: OAT needs at least one λ > 0 to train the robust end")

    def step(x, y):
        batch = len(x)
        zeros = min(batch, math.ceil(batch / len(lambdas))) if 0 in lambdas else 0
        lam = torch.zeros(batch, device=x.device)
        pick = torch.randint(len(nonzero), (batch - zeros,))
        lam[zeros:] = nonzero[pick].to(x.device)
        cond = oat.encode(inner, lam)
        with oat.conditioned(inner, cond, ("split", zeros)):
            logits = model(x)
        per_sample = (1 - lam) * F.cross_entropy(logits, y, reduction="none")
        correct_adv = None
        if zeros < batch:
            with oat.conditioned(inner, cond[zeros:], "adv"):
                x_adv = attack(x[zeros:], y[zeros:])
                logits_adv = model(x_adv)
            adv_term = lam[zeros:] * F.cross_entropy(logits_adv, y[zeros:], reduction="none")
            per_sample = torch.cat([per_sample[:zeros], per_sample[zeros:] + adv_term])
            correct_adv = (logits_adv.detach().argmax(1) == y[zeros:]).sum()
        return StepOutput(per_sample.mean(), correct_clean=(logits.detach().argmax(1) == y).sum(),
                          correct_adv=correct_adv, n_adv=batch - zeros)
    return _ofa_objective(step)


@register_objective("float")
def float_objective(model, cfg):
    inner = unwrap(model)
    attack = training_pgd(model, cfg)

    def step(x, y):
        batch, half = len(x), len(x) // 2
        with float_noise.noisy(inner, 0.0, ("split", half), resample=True):
            logits = model(x)
        with float_noise.noisy(inner, 1.0, "adv", resample=True):
            x_adv = attack(x[half:], y[half:])
            logits_adv = model(x_adv)
        loss = 0.5 * F.cross_entropy(logits, y) + 0.5 * F.cross_entropy(logits_adv, y[half:], reduction="sum") / batch
        return StepOutput(loss, correct_clean=(logits.detach().argmax(1) == y).sum(),
                          correct_adv=(logits_adv.detach().argmax(1) == y[half:]).sum(), n_adv=batch - half)
    return _ofa_objective(step)
