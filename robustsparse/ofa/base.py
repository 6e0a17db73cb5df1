"""What every once-for-all (conditional) model shares: the method registry, λ at inference, the spec hook.

A conditional model is the registry's `ImageClassifier` converted in place by a method's ``convert`` (dual BN plus
FiLM for OAT, noisy convs for FLOAT, dual-mask convs for SMART) and tagged with ``ofa_method`` / ``ofa_options``.
It is trained through the ordinary trainer (its objective routes every forward itself) and is never evaluated as
is: ``at_lambda(model, λ)`` returns the plain ``nn.Module`` x -> logits for one λ, which is what the evaluator
attacks (same λ, mask, noise and BN path as that inference).

λ semantics shared by all methods: 0 = most accurate (clean path), 1 = most robust (adversarial path).
The BN path for 0 < λ < 1 follows the methods' own code: OAT uses BN_c iff λ = 0; FLOAT and SMART's weight
mixture use BN_c iff λ < 0.1 (FLOAT_v2's rule, method-notes §3(f).5).
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import UserError

#: FLOAT_v2's BN rule for intermediate λ: BN_c below this, BN_a from it on.
BN_CLEAN_BELOW = 0.1


@dataclass
class OfaMethod:
    name: str
    convert: Callable[[nn.Module, dict, int], nn.Module]  # (built model, ofa options, seed) -> conditional model
    at_lambda: Callable[[nn.Module, float, str | None], nn.Module]  # (model, λ, mix) -> plain module for that λ


OFA_METHODS: dict[str, OfaMethod] = {}


def register_ofa(name: str, convert, at_lambda) -> None:
    OFA_METHODS[name] = OfaMethod(name, convert, at_lambda)


def ofa_spec(cfg) -> dict:
    """The part of a checkpoint's ``model_spec`` that rebuilds a conditional model ({} for a plain method)."""
    if cfg.train.method not in OFA_METHODS:
        return {}
    return {"ofa": {"method": cfg.train.method, "options": dataclasses.asdict(cfg.ofa), "seed": cfg.train.seed}}


def make_conditional(model: nn.Module, ofa: dict) -> nn.Module:
    """Convert a freshly built registry model into ``ofa['method']``'s conditional model (in place)."""
    method = OFA_METHODS.get(ofa.get("method"))
    if method is None:
        raise UserError(f"unknown once-for-all method {ofa.get('method')!r}; known: {', '.join(sorted(OFA_METHODS))}")
    model = method.convert(model, dict(ofa["options"]), int(ofa.get("seed", 0)))
    model.ofa_method = method.name
    model.ofa_options = dict(ofa["options"])
    return model


def ofa_method_of(model: nn.Module) -> str | None:
    """The once-for-all method a model was converted for, or None for a plain model."""
    return getattr(model, "ofa_method", None)


def check_lambda(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or not 0 <= lam <= 1:
        raise UserError(f"lam must be a number in [0, 1] (0 = most accurate, 1 = most robust), got {lam!r}")
    return float(lam)


def at_lambda(model: nn.Module, lam: float, mix: str | None = None) -> nn.Module:
    """The plain module (eval mode) that a conditional model is at trade-off ``lam``.

    ``mix`` only matters for SMART (switch | weight | logit; None = the run's ``ofa.mix``).
    """
    name = ofa_method_of(model)
    if name is None:
        raise UserError("this model is not a once-for-all model; it has no λ to set")
    lam = check_lambda(lam)
    if mix is not None and name != "smart":
        raise UserError(f"mix={mix!r} applies to SMART only; a {name} model conditions on λ directly")
    return OFA_METHODS[name].at_lambda(model, lam, mix).eval()


class AtLambda(nn.Module):
    """A conditional model fixed at one λ: ``forward(x)`` configures the model (via ``configure``, a context
    manager factory ``configure(model, lam, batch_size)``), runs it and restores the previous configuration."""

    def __init__(self, model: nn.Module, lam: float, configure):
        super().__init__()
        self.model = model
        self.lam = float(lam)
        self._configure = configure

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._configure(self.model, self.lam, x.shape[0]):
            return self.model(x)

    def extra_repr(self) -> str:
        return f"{self.model.ofa_method} at lam={self.lam:g}"


@contextmanager
def restoring(modules, attribute: str, value):
    """Set ``attribute`` to ``value`` on every module, restoring each one's previous value on exit."""
    saved = [(m, getattr(m, attribute)) for m in modules]
    try:
        for m, _ in saved:
            setattr(m, attribute, value)
        yield
    finally:
        for m, previous in saved:
            setattr(m, attribute, previous)


def conditioned_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a method conditions (FLOAT's noise, SMART's masks), in forward-definition order: every Conv2d and
    Linear except the last Linear, the classifier, which stays dense and shared (method-notes §3(b).3)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    last_linear = max((i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
    return {n: m for i, (n, m) in enumerate(layers) if i != last_linear}


def unwrap(model: nn.Module) -> nn.Module:
    """The conditional model inside what the trainer's engine hands an objective (torch.compile, DDP wrappers):
    routing and conditioning are set on it, while forwards go through the wrapper."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DistributedModel"):
            inner = model.module
        if inner is None:
            return model
        model = inner


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
