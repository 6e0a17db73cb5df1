"""FLOAT: Fast Learnable Once-for-All adversarial Training (Kundu et al., WACV 2023), as in FLOAT_v2's
``noise_Conv2d`` (method-notes §5.2): weight conditioning by λ-scaled noise with a learnable per-layer scale.

Every conditioned layer (each Conv2d and hidden Linear; the classifier stays plain) computes with

    W_eff = W + α · λ · η,   η ~ N(0, std(W)²) elementwise (std over the whole tensor, no gradient through η),

α a learnable scalar per layer (initialised to ``ofa.noise_init``, 0.25), λ = 0 on the clean path. BN is dual.
Training (λ = 1 only, half batch):
  z = f(x; W, BN split at B/2)                                   (all B clean images)
  x̃ = PGD-k(f(·; W + α·η, BN_a), x[B/2:], y[B/2:])                (eval mode, no parameter grads)
  L = mean_B( 0.5 · CE(z, y) + 0.5 · CE(f(x̃; W + α·η, BN_a), y) · [i ≥ B/2] )
Inference at λ: λ < 0.1 → BN_c and no noise; otherwise BN_a and noise scaled by λ.

η is resampled at every forward while training (as in FLOAT_v2). At inference it is a fixed draw: a standard-normal
buffer ``noise_unit`` saved with the model, scaled by std(W). A deployed FLOAT model is therefore deterministic and
the evaluator's gradient attacks see the same function they are scored on; FLOAT_v2 resampled at test time too,
which makes a randomised model whose PGD numbers need EoT.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..models.dual_bn import bn_route, convert_to_dual_bn
from .base import BN_CLEAN_BELOW, AtLambda, conditioned_layers, register_ofa, replace_module, restoring


class _Noisy:
    """Mixin for a conv/linear with FLOAT noise; ``lam`` and ``resample`` are set by `noisy`."""

    def _init_noise(self, alpha: float, seed: int) -> None:
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("noise_unit", torch.randn(self.weight.shape, generator=gen).to(self.weight))
        self.lam = 0.0
        self.resample = False

    def noisy_weight(self) -> torch.Tensor:
        if self.lam == 0:
            return self.weight
        with torch.no_grad():
            unit = torch.randn_like(self.weight) if self.resample else self.noise_unit
            eta = self.weight.std() * unit
        return self.weight + self.alpha * self.lam * eta

    def extra_ops(self, out: torch.Tensor) -> int:
        """Per inference: scale η by α·λ and add it to W, one multiply and one add per weight (0 when λ = 0)."""
        return 0 if self.lam == 0 else 2 * self.weight.numel()


class NoisyConv2d(_Noisy, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.noisy_weight(), self.bias)


class NoisyLinear(_Noisy, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.noisy_weight(), self.bias)


def _noisy_copy(layer: nn.Module, alpha: float, seed: int) -> nn.Module:
    cls = NoisyConv2d if isinstance(layer, nn.Conv2d) else NoisyLinear
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)  # the same Parameters, hyper-parameters and hooks
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    new._init_noise(alpha, seed)
    return new


def convert(model, options: dict, seed: int):
    convert_to_dual_bn(model)
    for i, name in enumerate(conditioned_layers(model)):
        replace_module(model, name, _noisy_copy(model.get_submodule(name), options["noise_init"], seed * 7919 + i))
    return model


def noisy_layers(model) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _Noisy)]


@contextmanager
def noisy(model, lam: float, route, resample: bool):
    layers = noisy_layers(model)
    with restoring(layers, "lam", float(lam)), restoring(layers, "resample", resample), bn_route(model, route):
        yield model


def _configure(model, lam: float, batch_size: int):
    clean = lam < BN_CLEAN_BELOW
    return noisy(model, 0.0 if clean else lam, "clean" if clean else "adv", resample=False)


def at_lambda(model, lam: float, mix=None):
    return AtLambda(model, lam, _configure)


register_ofa("float", convert, at_lambda)
