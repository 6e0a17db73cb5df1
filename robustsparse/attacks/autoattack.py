"""AutoAttack, standard version (Croce & Hein, 2020), at the FULL budget, as a cascade of torchattacks components.

    APGD-CE (100 steps, 1 restart) → APGD-T (DLR, 100 steps, 9 target classes) → FAB-T (100 steps, 9 targets)
    → Square (5000 queries, p_init 0.8)

Each component attacks only the points still robust after the previous ones, and a point counts as robust only if
every component failed on it (pointwise worst case). This is the official ``version='standard'`` schedule; note that
``torchattacks.AutoAttack`` runs APGD with 10 steps (torchattacks #196), which is why it is not used here.
Every returned point is projected back onto the ε-ball and [0, 1] before it is counted, so a component that
overshoots the budget can never inflate the attack's success.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import attack_mode, full_precision, project

COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
STANDARD_BUDGET = {"apgd-ce": 100, "apgd-t": 100, "fab-t": 100, "square": 5000}


def _torchattacks():
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - install-time problem
        from ..errors import UserError
        raise UserError("AutoAttack needs torchattacks: pip install --no-deps torchattacks==3.5.1 "
                        "(--no-deps: its metadata asks for torchvision, which it never imports)") from exc
    return torchattacks


def build_component(name: str, model: nn.Module, eps: float, norm: str, num_classes: int, seed: int = 0):
    """One AutoAttack component at the standard budget (targeted ones use min(9, C−1) target classes)."""
    ta = _torchattacks()
    n_targets = max(1, min(9, num_classes - 1))
    if name == "apgd-ce":
        atk = ta.APGD(model, norm=norm, eps=eps, steps=STANDARD_BUDGET[name], n_restarts=1, loss="ce", seed=seed)
    elif name == "apgd-t":
        atk = ta.APGDT(model, norm=norm, eps=eps, steps=STANDARD_BUDGET[name], n_restarts=1, seed=seed,
                       n_classes=num_classes)
        atk.n_target_classes = n_targets
    elif name == "fab-t":
        atk = ta.FAB(model, norm=norm, eps=eps, steps=STANDARD_BUDGET[name], n_restarts=1, seed=seed,
                     multi_targeted=True, n_classes=num_classes)
        atk.n_target_classes = n_targets
    elif name == "square":
        atk = ta.Square(model, norm=norm, eps=eps, n_queries=STANDARD_BUDGET[name], n_restarts=1, p_init=0.8,
                        loss="margin", resc_schedule=True, seed=seed)
    else:
        raise ValueError(f"unknown AutoAttack component {name!r}; known: {', '.join(COMPONENTS)}")
    return atk


def describe_component(name: str, eps: float, norm: str, num_classes: int) -> str:
    n_targets = max(1, min(9, num_classes - 1))
    norm_txt = "L∞" if norm == "Linf" else "L2"
    budget = {"apgd-ce": "100 steps", "apgd-t": f"100 steps, {n_targets} targets",
              "fab-t": f"100 steps, {n_targets} targets", "square": "5000 queries"}[name]
    return f"{name.upper()} ({budget}) {norm_txt} eps={eps:.4g}"


@torch.no_grad()
def _still_correct(model, x_adv, y, batch_size):
    out = [model(x_adv[i:i + batch_size]).argmax(1) == y[i:i + batch_size] for i in range(0, len(y), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=y.device)


def run_component(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, robust: torch.Tensor,
                  eps: float, norm: str, num_classes: int, batch_size: int = 500, seed: int = 0,
                  progress=None, chunks=None) -> torch.Tensor:
    """Attack the points flagged robust with one component; return the updated robust flags (bool, (N,)).

    ``chunks(robust, attack_chunk) -> flags``, if given, runs the loop over chunks instead (the evaluator's
    resumable one, eval/state.py); each component reseeds itself on every call, so a chunk's result depends on
    that chunk only."""
    robust = robust.clone()
    idx = robust.nonzero().flatten()
    if len(idx) == 0:
        return robust
    atk = build_component(name, model, eps, norm, num_classes, seed)

    def attack_chunk(chunk):
        xb, yb = x[chunk], y[chunk]
        x_adv = atk(xb, yb)
        x_adv = (xb + project(x_adv - xb, eps, norm)).clamp(0.0, 1.0)
        return _still_correct(model, x_adv, yb, batch_size)

    with attack_mode(model), full_precision(x.device):  # a reported attack: fp32 under any caller's autocast
        if chunks is not None:
            return chunks(robust, attack_chunk)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            robust[chunk] = attack_chunk(chunk)
            if progress is not None:
                progress(len(chunk))
    return robust
