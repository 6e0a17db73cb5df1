"""How a training step runs: device, memory format, precision, compilation, data parallelism. Shared by the trainer
and ``robustsparse bench``, so the benchmark times the step the trainer takes.

One step (PGD-AT: k attack forward/backward passes, one training forward/backward, one optimizer step):

    with engine.autocast():  out = objective(engine.layout(x), y)    # attack: eval mode, no parameter grads
    optimizer.zero_grad(set_to_none=True);  engine.backward(out.loss);  engine.optimizer_step(optimizer)

Options (``train.*``):

* ``channels_last`` (None = auto: on for CUDA): NHWC weights and batches, cuDNN's fast convolution layout
  (tensor cores). Off on CPU by default: oneDNN picks its own blocked layout there.
* ``amp`` (auto | bf16 | fp16 | fp32; auto = bf16 on CUDA with bf16 support, fp16 on older GPUs, bf16 on CPUs
  with native bf16 (AMX-BF16 or AVX512-BF16), fp32 on other CPUs; `robustsparse.train.precision` decides and
  ``describe()`` records its reason in run.json): autocast casts per operation, the parameters, gradients and
  optimizer state stay fp32 (master weights). bf16 has fp32's range, so it needs no loss scaling and the step
  never synchronises with the host. fp16 scales the loss (``GradScaler``; its scale is saved in checkpoints),
  which reads one overflow flag per step, and its attack gradients are unscaled (a sign step survives that; pick
  bf16 where the GPU has it). The training attack runs inside the step, so in the step's precision; validation,
  ``eval`` and every reported attack run in fp32 (`robustsparse.eval.evaluate` turns autocast off, whatever
  context it is called in).
* ``compile`` (default off): ``torch.compile`` of the model the objective calls; the checkpointed module is the
  plain one, so checkpoints do not depend on it. Compilation costs minutes and pays off on long GPU runs only.
* Under ``torchrun`` the model is wrapped for DDP (`robustsparse.train.distributed`).

What makes the step fast without any of those: the data already on the device (no loader, no host copies), the
attack computing no parameter gradients (only ∂loss/∂x: about a third less work per attack step than
``loss.backward()``), no ``.item()`` or other host synchronisation in the step, and in-place updates.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from . import distributed, precision
from .distributed import Distributed

AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")


def resolve_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """(precision, reason): ``amp`` itself when given, else `precision.auto_precision`'s choice for ``device``."""
    if amp not in AMP_CHOICES:
        raise UserError(f"amp must be one of {', '.join(AMP_CHOICES)}; got {amp!r}")
    if amp != "auto":
        return amp, f"amp={amp} requested"
    chosen, reason = precision.auto_precision(device)
    return chosen, f"auto: {reason}"


def _grad_scaler(device: torch.device):
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type)
    if device.type == "cuda":
        return torch.cuda.amp.GradScaler()
    raise UserError("amp=fp16 on CPU needs torch >= 2.3; use amp=bf16 or amp=fp32")


@dataclass
class Engine:
    device: torch.device
    amp: str = "fp32"  # resolved: bf16 | fp16 | fp32
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = True
    dist: Distributed | None = None
    amp_reason: str = "amp=fp32 requested"

    def __post_init__(self):
        self.scaler = _grad_scaler(self.device) if self.amp == "fp16" else None

    @classmethod
    def create(cls, device: torch.device, amp: str = "auto", channels_last: bool | None = None,
               compile: bool = False, sync_bn: bool = True, distributed_env: bool = False) -> "Engine":
        """Resolve the automatic choices for ``device``; with ``distributed_env`` join torchrun's process group
        (if there is one), which also fixes the device (``cuda:LOCAL_RANK``)."""
        d = distributed.init_from_env(device) if distributed_env else None
        if d is not None:
            device = d.device
        amp, reason = resolve_amp(amp, device)
        return cls(device, amp, device.type == "cuda" if channels_last is None else bool(channels_last),
                   bool(compile), bool(sync_bn), d, reason)

    @classmethod
    def from_train_config(cls, t, device: torch.device) -> "Engine":
        """The trainer's engine; under torchrun ``train.batch_size`` is the global batch and must divide by N."""
        world = distributed.world_size_from_env()
        if world > 1 and t.batch_size % world:
            raise UserError(f"train.batch_size={t.batch_size} is the global batch and must divide by the "
                            f"{world} processes of torchrun")
        return cls.create(device, amp=t.amp, channels_last=t.channels_last, compile=t.compile, sync_bn=t.sync_bn,
                          distributed_env=True)

    # -- data parallelism -------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return 0 if self.dist is None else self.dist.rank

    @property
    def world_size(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        return distributed.shard(t, self.dist)

    def rank_seed(self, seed: int) -> int:
        return distributed.rank_seed(seed, self.dist)

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(t, self.dist)

    def close(self) -> None:
        distributed.close(self.dist)

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs):
        """`robustsparse.evaluate` on this rank's share of (x, y) (every world_size-th point) with the accuracies
        summed over ranks: every rank gets the global numbers (only ``accuracy`` and ``attacks`` are global)."""
        from ..eval import evaluate
        if self.dist is None:
            return evaluate(model, x, y, **kwargs)
        xs, ys = x[self.rank::self.world_size], y[self.rank::self.world_size]
        res = evaluate(model, xs, ys, **kwargs)
        keys = sorted(res.accuracy)
        counts = [round(res.accuracy[k] * len(ys)) for k in keys] + [len(ys)]
        total = self.sum_over_ranks(torch.tensor(counts, dtype=torch.float64, device=self.device)).tolist()
        res.accuracy = {k: total[i] / total[-1] for i, k in enumerate(keys)}
        return res

    # -- the model --------------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Set ``model`` up in place (memory format, synchronised BN) and return the module objectives should call
        (compiled and/or DDP-wrapped). Checkpoints, validation and the optimizer keep using ``model``: it holds the
        same parameters."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.dist is not None and self.sync_bn:
            distributed.convert_sync_bn(model, self.device)
        runner = torch.compile(model) if self.compile else model
        if self.dist is not None:
            runner = distributed.wrap_ddp(runner, model, self.dist)
        return runner

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    # -- the step ---------------------------------------------------------------------------------------------
    def autocast(self):
        if self.amp == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:  # skips the step when the scaled gradients overflowed, then adapts the scale
            self.scaler.step(optimizer)
            self.scaler.update()

    def step(self, objective, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
        """One full training step (what the trainer's loop does, in one call): returns the objective's output."""
        with self.autocast():
            out = objective(self.layout(x), y)
        optimizer.zero_grad(set_to_none=True)
        self.backward(out.loss)
        self.optimizer_step(optimizer)
        return out

    # -- checkpoints and reports ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state a checkpoint needs for an exact resume (the fp16 loss scale)."""
        if self.scaler is None:
            return {}
        return {"grad_scaler": {k: (float(v) if torch.is_tensor(v) else v)
                                for k, v in self.scaler.state_dict().items()}}

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def describe(self) -> dict:
        return {"device": str(self.device), "amp": self.amp, "amp_reason": self.amp_reason,
                "channels_last": self.channels_last,
                "compile": self.compile, "world_size": self.world_size,
                "sync_bn": self.sync_bn if self.dist is not None else None}
