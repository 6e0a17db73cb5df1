"""OAT: Once-for-All Adversarial Training (Wang et al., NeurIPS 2020), as in VITA-Group's code (method-notes §5.1).

Activation conditioning: after every BN except the shortcut BNs (and, in pre-activation nets, the final BN),

    FiLM(h; λ) = h · μ(e(λ)) + σ(e(λ)),   [μ, σ] = leaky_relu(W₂ · leaky_relu(W₁ e(λ) + b₁) + b₂)  ∈ ℝ^{2C}

with e(λ) the λ encoding: ``rand`` (OAT's default: row j of a random orthogonal dim×dim matrix for the j-th λ of
the training set; a λ between two training values gets the linear interpolation of their rows) or ``scalar``
(e(λ) = λ, FiLM input size 1: the structure of the thop count in resnet_OAT.py, 31,403,978 for ResNet-34).

Training, per batch of B (OAT "efficient" mode):
  λ_i = 0 for the first ⌈B/|Λ|⌉ samples, else uniform on Λ∖{0}      (Λ = ofa.lambdas, default {0,.1,.2,.3,.4,1})
  z_i = f(x_i; λ_i) with BN_c for the λ=0 samples and BN_a for the rest (dual BN split at ⌈B/|Λ|⌉)
  x̃_i = PGD-k(f(·; λ_i, BN_a), x_i, y_i) for the λ>0 samples (eval mode, no parameter grads)
  L = mean_i [ (1 − λ_i) · CE(z_i, y_i) + λ_i · CE(f(x̃_i; λ_i, BN_a), y_i) ]
Inference at λ: FiLM conditioned on e(λ); BN_c iff λ = 0.

A network without BN (the TRADES SmallCNN of ``fmnist_pgdat``) has no site of OAT's code, and FiLM after BN would
leave it unconditioned: every λ the same network. ``ofa.film_at`` (method-notes [INFERRED]): ``bn`` (OAT's code;
refused on a model without BN), ``conv`` (after every convolution, where its BN would be; each FiLM starts at the
identity, μ = 1 and σ = 0, since no BN restores the scale a random FiLM gives), ``auto`` (default: bn if the model
has a BN, else conv).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.dual_bn import DualBatchNorm2d, bn_route, convert_to_dual_bn
from .base import AtLambda, register_ofa, replace_module, restoring


class FiLM(nn.Module):
    """OAT's FiLM_Layer: an MLP from the λ encoding to a per-channel scale μ and shift σ."""

    def __init__(self, channels: int, in_features: int):
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(in_features, 2 * channels), nn.LeakyReLU(inplace=True),
                                 nn.Linear(2 * channels, 2 * channels))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        mu, sigma = F.leaky_relu(self.mlp(cond)).split(self.channels, dim=-1)
        return h * mu.view(-1, self.channels, 1, 1) + sigma.view(-1, self.channels, 1, 1)

    def extra_ops(self, out: torch.Tensor) -> int:
        """Element-wise operations per image beyond the base network: one multiply and one add per activation."""
        return 2 * out[0].numel()


class _FiLMAfter(nn.Module):
    """A layer followed by FiLM; ``cond`` (N or 1, dim) is set by `conditioned` before every forward. The layer is
    held under its kind's name (``bn``, ``conv``), so checkpoints keep their keys."""

    def __init__(self, kind: str, layer: nn.Module, channels: int, in_features: int):
        super().__init__()
        self.kind = kind
        setattr(self, kind, layer)
        self.film = FiLM(channels, in_features)
        self.cond = None

    def forward(self, x):
        if self.cond is None:
            raise RuntimeError("an OAT model was run without λ; use robustsparse.ofa.at_lambda(model, lam)")
        return self.film(getattr(self, self.kind)(x), self.cond)


class BatchNormFiLM(_FiLMAfter):
    """A dual BN followed by FiLM: OAT's site."""

    def __init__(self, bn: DualBatchNorm2d, in_features: int):
        super().__init__("bn", bn, bn.num_features, in_features)


class ConvFiLM(_FiLMAfter):
    """A convolution followed by FiLM: OAT's conditioning where a network has no BN (``ofa.film_at=conv``)."""

    def __init__(self, conv: nn.Conv2d, in_features: int):
        super().__init__("conv", conv, conv.out_channels, in_features)
        # Start at the identity (μ = 1, σ = 0 for every λ). OAT's random init gives mean |μ| 0.02-0.04 a
        # channel; after a BN the next BN undoes that scale, but without BN four such layers shrink the signal
        # ~10⁶× and the network never leaves chance (measured: fmnist OAT, loss 2.303 and 10% for a whole
        # epoch). The last layer's bias carries the 1, its zeroed weight still gets a gradient, so
        # λ-dependence is learned from there.
        last = self.film.mlp[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
            last.bias[:conv.out_channels] = 1.0


def _final_preact_bn(model) -> str | None:
    """OAT puts no FiLM after the last BN of a pre-activation net (WRN, PreAct-ResNet)."""
    from ..models.resnet import ResNet
    from ..models.wide_resnet import WideResNet
    net = getattr(model, "net", None)
    if isinstance(net, WideResNet):
        return "net.bn1"
    if isinstance(net, ResNet) and net.preact:
        return "net.bn"
    return None


def film_sites(model) -> list[str]:
    """Names of the dual BNs (after `convert_to_dual_bn`) that get a FiLM: all but the shortcut BNs and a
    pre-activation net's final BN."""
    final = _final_preact_bn(model)
    return [n for n, m in model.named_modules()
            if isinstance(m, DualBatchNorm2d) and "shortcut" not in n.split(".") and n != final]


def _codes(options: dict, seed: int) -> torch.Tensor:
    lambdas = sorted(options["lambdas"])
    if options["encoding"] == "scalar":
        return torch.tensor(lambdas, dtype=torch.float32).view(-1, 1)
    dim = options["encoding_dim"]
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))  # OAT: a random orthogonal matrix
    return q[:len(lambdas)].contiguous()


def conv_sites(model) -> list[str]:
    """Names of every convolution: the FiLM sites of ``ofa.film_at=conv``."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def film_placement(model, film_at: str) -> str:
    """``bn`` or ``conv`` for ``ofa.film_at`` on this (not yet converted) model; a request it cannot meet is refused."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if film_at == "auto":
        return "bn" if has_bn else "conv"
    if film_at == "bn" and not has_bn:
        raise UserError("ofa.film_at=bn: this model has no BatchNorm, so OAT would have no FiLM layer and one network "
                        "for every λ; use ofa.film_at=conv (or auto)")
    return film_at


def convert(model, options: dict, seed: int):
    placement = film_placement(model, options.get("film_at", "auto"))  # runs saved before film_at: auto
    convert_to_dual_bn(model)
    codes = _codes(options, seed)
    if placement == "bn":
        sites = [(n, BatchNormFiLM(model.get_submodule(n), codes.shape[1])) for n in film_sites(model)]
    else:
        sites = [(n, ConvFiLM(model.get_submodule(n), codes.shape[1])) for n in conv_sites(model)]
    if not sites:
        raise UserError(f"OAT: this model has no {'BN' if placement == 'bn' else 'convolution'} to put FiLM after")
    for name, module in sites:
        replace_module(model, name, module)
    model.register_buffer("lambda_codes", codes)  # a buffer on the Sequential root: saved, never run
    model.register_buffer("lambda_values", torch.tensor(sorted(options["lambdas"]), dtype=torch.float32))
    return model


def encode(model, lam: torch.Tensor) -> torch.Tensor:
    """e(λ) for a 1-D tensor of λ values: piecewise-linear in λ through the training set's codes (exact there)."""
    values, codes = model.lambda_values.to(lam.device), model.lambda_codes.to(lam.device)
    if model.ofa_options["encoding"] == "scalar":
        return lam.view(-1, 1).to(codes.dtype)
    if len(values) == 1:
        return codes[:1].expand(len(lam), -1)
    lam = lam.clamp(values[0], values[-1])
    hi = torch.searchsorted(values, lam).clamp(1, len(values) - 1)
    lo = hi - 1
    w = ((lam - values[lo]) / (values[hi] - values[lo])).unsqueeze(1)
    return (1 - w) * codes[lo] + w * codes[hi]


@contextmanager
def conditioned(model, cond: torch.Tensor, route):
    films = [m for m in model.modules() if isinstance(m, _FiLMAfter)]
    with restoring(films, "cond", cond), bn_route(model, route):
        yield model


def _configure(model, lam: float, batch_size: int):
    cond = encode(model, torch.tensor([lam], device=model.lambda_codes.device))
    return conditioned(model, cond, "clean" if lam == 0 else "adv")


def at_lambda(model, lam: float, mix=None):
    return AtLambda(model, lam, _configure)


register_ofa("oat", convert, at_lambda)
