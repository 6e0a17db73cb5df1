"""One attack base class and the context every attack runs under.

Contract (torchattacks style): ``attack(x, y) -> x_adv`` with ``x`` float images in [0, 1] of shape (N, C, H, W),
``y`` int64 labels (N,); ``x_adv`` has the same shape, lies in [0, 1] and within the threat model's ball around ``x``.
The model is put in eval mode with parameter gradients off for the whole attack and restored afterwards, so an attack
never updates BN statistics and never accumulates parameter gradients (peers.md §6.4: attacks generated in train mode
are a classic source of wrong numbers).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

NORMS = ("Linf", "L2")


@contextmanager
def attack_mode(model: nn.Module):
    """Eval mode and ``requires_grad=False`` on every parameter; both restored on exit, even on error."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def full_precision(device: torch.device | str):
    """Autocast off for ``device``'s type: a reported attack and its accuracy are computed in fp32 even when the
    caller runs inside a bf16/fp16 autocast region (e.g. a training loop's). The training attack does not use this:
    it is part of the training step and runs in the step's precision."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, enabled=False)


@contextmanager
def channels_last_weights(model: nn.Module, enabled: bool = True):
    """The model's 4-D weights and buffers in NHWC (channels_last) memory for the block, the caller's own tensors
    put back on exit, even on error. The same convolutions in another memory layout: oneDNN's fast path on CPU,
    equal to NCHW up to float summation order. Parameters stay the same objects (only ``.data`` is swapped), so
    hooks, masks and optimizers that hold them see nothing change."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dim() == 4] if enabled else []
    saved = [t.data for t in tensors]
    for t in tensors:
        t.data = t.data.contiguous(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        for t, data in zip(tensors, saved):
            t.data = data


class MicroBatched(nn.Module):
    """``model`` run ``size`` images at a time, the outputs concatenated: per image the same function, and the same
    gradient (each image's output depends on that image only; eval mode, no batch statistics). On CPU a chunk of
    a few hundred 28×28 images spills its activation maps out of the cache; 64 at a time ran an attack step
    (forward + input gradient) 2× faster, and bit for bit the same on the Zen 5 it was measured on; kernels chosen
    by batch size may round differently elsewhere (docs/benchmarks.md, "Evaluator")."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model = model
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) <= self.size:
            return self.model(x)
        return torch.cat([self.model(x[i:i + self.size]) for i in range(0, len(x), self.size)])


@torch.no_grad()
def activation_bytes_per_image(model: nn.Module, image: torch.Tensor) -> int:
    """The largest output of any leaf module for one image, in bytes (one probe forward in eval mode)."""
    largest = [image.numel() * image.element_size()]

    def record(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        with attack_mode(model):
            model(image[None])
    finally:
        for h in handles:
            h.remove()
    return largest[0]


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project a perturbation onto the ε-ball of the given norm (per sample)."""
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / flat).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A uniform random point of the ε-ball (L∞: per-pixel uniform; L2: uniform direction and radius), in [0, 1]."""
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        direction = torch.randn_like(x)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype).pow(1.0 / x[0].numel()) * eps
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


def steepest_step(x_adv: torch.Tensor, grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    """One ascent step of size α in the norm's steepest direction (sign for L∞, normalised gradient for L2)."""
    if norm == "Linf":
        return x_adv + alpha * grad.sign()
    g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return x_adv + alpha * grad / g_norm


class Attack:
    """Base class: owns the model, the threat model (norm, ε) and the eval/no-grad context.

    Subclasses implement :meth:`perturb` and :meth:`describe`; callers use ``attack(x, y)``.
    """

    name = "attack"

    def __init__(self, model: nn.Module, eps: float, norm: str = "Linf"):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.model = model
        self.eps = float(eps)
        self.norm = norm

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with attack_mode(self.model):
            x_adv = self.perturb(x.detach(), y.detach())
        return x_adv.detach()

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        """Attack name with its full budget, printed next to every accuracy it produces."""
        return f"{self.name} {self.norm} eps={self.eps:.4g}"

    def input_grad(self, x_adv: torch.Tensor, loss_fn) -> torch.Tensor:
        """Gradient of ``loss_fn(model(x_adv))`` w.r.t. the input only (parameters are frozen by attack_mode)."""
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(self.model(x_adv))
            (grad,) = torch.autograd.grad(loss, x_adv)
        return grad
