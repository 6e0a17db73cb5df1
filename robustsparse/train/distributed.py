"""Data-parallel training under ``torchrun``: one process per device, the global batch split by rank.

    torchrun --nproc_per_node=N -m robustsparse.cli train CONFIG --out RUN      (gloo on CPU, nccl on CUDA)

What makes N processes compute the single-process algorithm:

* **Batches.** Every rank draws the same per-step permutation and augmentation of the *global* batch
  (``train.batch_size``, which must divide by N) and keeps its contiguous slice ``rank·B/N … (rank+1)·B/N``. The
  union of the shards is exactly the single-process batch.
* **Gradients.** The training forward goes through ``DistributedDataParallel``, which averages the gradients of
  the per-rank mean losses: the gradient of the global mean loss.
* **Attacks.** Each rank attacks its own shard, on the plain module (`DistributedModel` sends every forward with
  parameter gradients off, i.e. under `attack_mode`, past DDP): an attack forward has no backward into the
  parameters, and DDP's reducer must never see one.
* **BatchNorm.** With ``train.sync_bn`` (default) BN normalises by the statistics of the global batch, as the single
  process does: ``torch.nn.SyncBatchNorm`` on CUDA, `GlobalBatchNorm2d` (two autograd all-reduces) on CPU/gloo,
  where torch's SyncBatchNorm does not run. Without it every rank uses its shard's statistics (ghost BN, a different
  algorithm, and BN's running statistics are rank 0's).
* **Random numbers.** Rank 0 seeds the global RNG with the step seed, other ranks with a seed derived from it and
  their rank, so ranks draw different attack random starts and dropout masks. Those draws are therefore not the
  single process's: a DDP run equals the single-process run exactly when the step has no such randomness
  (``attack.random_start=false``, no dropout), and in distribution otherwise.
* **Metrics** are summed over ranks once per epoch (and at a step checkpoint); validation is sharded
  (``rank::N``) and its correct counts summed. Only rank 0 writes the run folder (checkpoints, logs, plots).

Checkpoints hold no rank-specific state (the model and optimizer are identical on every rank, the epoch
accumulators are global sums), so a run resumes under any world size whose N divides the batch, including 1.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError

TIMEOUT_ENV = "ROBUSTSPARSE_DIST_TIMEOUT"  # seconds a collective may wait before the run fails (default 1800)


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we destroy it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_from_env(device: torch.device) -> Distributed | None:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), or return None
    for a single process. CUDA ranks take ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` is refused under torchrun."""
    world = world_size_from_env()
    if world <= 1 and not dist.is_initialized():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None and world > 1:
            raise UserError(f"train.device={device} under torchrun: use train.device=cuda or auto, each rank "
                            "takes cuda:LOCAL_RANK")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    d = Distributed(dist.get_rank(), dist.get_world_size(), device, owns)
    barrier()  # every rank has checked the run folder before rank 0 creates it
    return d


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def close(d: Distributed | None) -> None:
    """End of a distributed run. Every rank waits for the others first: rank 0 still writes the run folder after the
    last collective, and a rank that left early could read a half-written folder or tear the group down under it."""
    if d is None or not dist.is_initialized():
        return
    barrier()
    if d.owns_group:
        dist.destroy_process_group()


def shard(t: torch.Tensor, d: Distributed | None) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (the batch itself for a single process)."""
    if d is None:
        return t
    per_rank = len(t) // d.world_size
    return t[d.rank * per_rank:(d.rank + 1) * per_rank]


def all_reduce_sum(t: torch.Tensor, d: Distributed | None) -> torch.Tensor:
    """The sum over ranks (a new tensor; ``t`` is left as it is)."""
    if d is None:
        return t.clone()
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def rank_seed(seed: int, d: Distributed | None) -> int:
    """Rank 0 keeps the step seed (a 1-process run is the plain run); other ranks get their own stream."""
    if d is None or d.rank == 0:
        return seed
    return (seed * 1_000_033 + d.rank) % (2**63 - 1)


class RowsOnly:
    """The metrics log of a rank other than 0: the rows (the overfitting check reads them, and must decide as rank
    0 does), no files."""

    def __init__(self, run_dir: str, resume_epoch: int | None = None, purge_step: int | None = None):
        from ..runs.logger import read_metrics
        self.rows = [r for r in read_metrics(run_dir) if resume_epoch is None or r["epoch"] < resume_epoch]

    def append(self, row: dict, step: int) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
# The model the objective sees


class DistributedModel(nn.Module):
    """DDP for the training forward, the plain module for every forward that cannot make parameter gradients.

    An objective calls one model for both its attack and its loss. Attack forwards run with the parameters'
    ``requires_grad`` off (`attack_mode`); sending them through DDP would prepare its reducer for a backward into
    the parameters that never comes, and would re-broadcast buffers k times per step. So a forward goes through DDP
    only when gradients are on and the parameters want them. Attributes the objective reads (``arch``,
    ``num_classes``, submodules) are those of the plain model.
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, plain: nn.Module):
        super().__init__()
        self.ddp = ddp
        self.__dict__["plain"] = plain  # not registered: the same parameters must not be listed twice
        # what DDP reduces: the parameters that trained when it was built (attack_mode switches them all off)
        self.__dict__["_reduced"] = [p for p in plain.parameters() if p.requires_grad]

    @property
    def module(self) -> nn.Module:
        """The plain model (the usual name for what a data-parallel wrapper wraps)."""
        return self.__dict__["plain"]

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._reduced):
            return self.ddp(*args, **kwargs)
        return self.ddp.module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            plain = self.__dict__.get("plain")
            if plain is None:  # half-built (copy, unpickling): no fallback yet
                raise
            return getattr(plain, name)


def wrap_ddp(model: nn.Module, plain: nn.Module, d: Distributed) -> DistributedModel:
    """``model`` (the plain module, or its compiled form) in DDP behind a `DistributedModel`."""
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    # DDP also broadcasts rank 0's buffers at each training forward: BN running statistics (identical anyway with
    # synchronised BN, rank 0's without it) and mask buffers.
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return DistributedModel(ddp, plain)


# ----------------------------------------------------------------------------------------------------------
# Global-batch BatchNorm


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch across all ranks.

        μ = Σ_ranks Σ x / n,   σ² = Σ_ranks Σ (x − μ)² / n,   y = (x − μ)/√(σ² + ε) · γ + β,   n = global count

    Two all-reduces per layer per training forward (the mean, then the centred sum of squares: no E[x²] − μ²
    cancellation), each differentiable, so the backward is the global batch's too. Running statistics are updated
    as torch's BatchNorm does (unbiased variance). Eval mode, or a single process, is plain BatchNorm2d. Used on
    CPU/gloo, where ``torch.nn.SyncBatchNorm`` does not run.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        # statistics in at least fp32 (under autocast too, as torch's BatchNorm keeps them); a float64 model keeps
        # float64, so a double-precision run is not rounded to fp32 here (the DDP test compares in float64)
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        c = x.shape[1]
        shape = (1, c, 1, 1)
        local = torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() / c)])
        total = all_reduce(local)
        n = total[c]
        mean = total[:c] / n
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of a sum over ranks is the sum over ranks of the gradients."""

    @staticmethod
    def forward(ctx, t):
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm2d use global-batch statistics; parameters and buffers are kept (same tensors), so the
    optimizer and checkpoints see no difference (state_dict keys are unchanged)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d  # a behaviour-only subclass: the module keeps its identity
    return model
