"""HYDRA (Sehwag et al., NeurIPS 2020): learn which weights of a robustly PRE-TRAINED network to keep, under the
robust loss, with the weights frozen; then fine-tune the kept weights (method-notes §5.3).

For every prunable layer with frozen weights W and real scores s of the same shape:

    s⁰    = sqrt(6 / fan_in) · W / max|W|          scaled score init (per layer): the first mask is LWM's
    m     = TopK_layer(|s|, k)                     recomputed from the scores for every step, k = prune.density
    W_eff = W ⊙ m
    ∂L/∂s = sign(s) ⊙ W ⊙ ∂L/∂W_eff                straight-through: ∂m/∂|s| is taken as 1

L is TRADES (``prune.hydra_objective=trades``, β = ``train.trades_beta`` = 6 by default; HYDRA's ``adv``
trainer) or PGD-AT (``pgd_at``). SGD (momentum ``train.momentum``, weight decay ``prune.hydra_weight_decay``) on
the scores with LR ``prune.hydra_lr`` under ``train.schedule``, for ``prune.hydra_epochs`` epochs. Weights and
biases are frozen; BN affine parameters train unless ``prune.freeze_bn`` (running statistics update in train mode
either way, as in HYDRA). The stage ends with the mask of the final scores. Fine-tuning is then ordinary training
from a ticket (the mask, W ⊙ m, and the stage's BN): see ``pipeline`` below and posttrain/pipeline.py.

``prune.scope=global`` ranks all layers together instead (our option; HYDRA is per layer). Per-layer counts are
HYDRA's ``n − int((1 − k) · n)`` (``prune.keep_count=reference``; ``round`` keeps ``round(k · n)``), with the
layer-collapse guard of ``masks_from_scores``. Before each step's loss, a train-mode forward of the clean batch
updates BN running statistics, as HYDRA's trainer does (``prune.hydra_pre_forward``; see ``_with_pre_forward``).

The score stage runs through the trainer's step loop (train/loop.py: the same per-step seeds, from prune.seed,
the engine's AMP/channels_last/compile from ``train.*``, the step checkpoints and ``ROBUSTSPARSE_KILL_AT_STEP``)
and the trainer's divergence guard (a NaN/inf or exploding loss, or a NaN score, stops it before the checkpoint).
The scores, the network (BN parameters and statistics), the optimizer and the partial-epoch sums are checkpointed
every ``train.checkpoint_every_steps`` steps and at each epoch end, so a killed stage resumes to the same mask.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..data import load_split
from ..eval import evaluate
from ..runs.checkpoint import load_checkpoint, load_optimizer, optimizer_tensors, save_checkpoint
from ..runs.logger import MetricsLog, write_status
from ..sparse import Mask, masks_from_scores, prunable_parameters
from ..train.engine import Engine
from ..train.guards import TrainingGuard
from ..train.loop import StepCounts, kill_step, run_steps, seeded_batches
from ..train.objectives import build_objective
from ..train.schedule import lr_at
from ..utils.device import resolve_device
from ..utils.progress import progress_bar
from .after import Outcome, after_scope, register_after_training

MASK_FILE = "mask.safetensors"


def scaled_scores(model: nn.Module) -> dict[str, Tensor]:
    """HYDRA's ``--scaled-score-init``: s = sqrt(6 / fan_in) · W / max|W| per prunable layer (fan_in = in × kernel
    area for a conv, in_features for a linear layer, as ``torch.nn.init`` computes it)."""
    out = {}
    for name, w in prunable_parameters(model).items():
        w = w.detach()
        fan_in = w[0].numel()
        out[name] = math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(torch.finfo(w.dtype).tiny)
    return out


class ScoredNetwork(nn.Module):
    """``net`` seen through its scores: every prunable weight W is replaced by W ⊙ TopK(|s|) in the forward pass,
    with the straight-through gradient to s. ``select()`` recomputes the mask from the current scores (once per
    optimizer step: the scores do not change within a step, so the attack and the loss see the same mask)."""

    def __init__(self, net: nn.Module, scores: dict[str, Tensor], density: float, scope: str = "layer",
                 min_layer_density: float = 0.0, count: str = "round"):
        super().__init__()
        self.net = net
        self.names = list(scores)
        self.scores = nn.ParameterList([nn.Parameter(scores[n].detach().clone()) for n in self.names])
        self.density, self.scope, self.min_layer_density, self.count = density, scope, min_layer_density, count
        self._weights = prunable_parameters(net)
        self.mask: Mask | None = None
        self.select()

    def score_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.scores))

    def select(self) -> Mask:
        self.mask = masks_from_scores({n: s.detach().abs() for n, s in self.score_dict().items()}, self.density,
                                      self.scope, self.min_layer_density, count=self.count)
        return self.mask

    def forward(self, x: Tensor) -> Tensor:
        params = {}
        for name, s in self.score_dict().items():
            a = s.abs()
            # value: the 0/1 mask exactly (a − a = 0); gradient: ∂/∂s = sign(s), i.e. straight through to |s|
            params[name] = self._weights[name] * (self.mask[name] + (a - a.detach()))
        return functional_call(self.net, params, (x,))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase)


def freeze_for_scoring(net: nn.Module, freeze_bn: bool) -> list[nn.Parameter]:
    """Freeze every parameter of ``net`` except BN affine parameters (unless ``freeze_bn``); return those left
    trainable, in a fixed order (the optimizer's, so its checkpoint indices are stable)."""
    trainable = []
    for module in net.modules():
        for p in module.parameters(recurse=False):
            keep = _is_norm(module) and not freeze_bn
            p.requires_grad_(keep)
            if keep:
                trainable.append(p)
    return trainable


@dataclass
class _ScoreStage:
    """What the score stage holds, built by ``_setup``."""
    cfg: object
    out: str
    engine: Engine
    net: nn.Module
    scored: ScoredNetwork
    optimizer: torch.optim.Optimizer
    objective: object
    data: tuple  # x_train, y_train, x_val, y_val on the device
    batch: int
    steps_per_epoch: int
    initial_mask: Mask

    def lr(self, global_step: int) -> float:
        p, t = self.cfg.prune, self.cfg.train
        return lr_at(global_step, self.steps_per_epoch * p.hydra_epochs, p.hydra_lr, t.schedule, 0, t.milestones)

    def checkpoint(self, epoch: int, step: int, epoch_sums: dict | None, seconds: float) -> None:
        tensors, groups = optimizer_tensors(self.optimizer)
        tensors.update({f"scores.{k}": v for k, v in self.scored.score_dict().items()})
        tensors.update({f"model.{k}": v for k, v in self.net.state_dict().items()})
        save_checkpoint(os.path.join(self.out, "checkpoints"), "last", tensors, {
            "epoch": epoch, "step": step, "epoch_sums": epoch_sums, "seconds": seconds,
            "optimizer_param_groups": groups, "config": self.cfg.to_dict(), "engine": self.engine.state_dict()})


def _setup(cfg, net: nn.Module, out: str) -> _ScoreStage:
    p, t = cfg.prune, cfg.train
    # one process (no torchrun group): the stage's own engine, for AMP, channels_last and compile
    engine = Engine.create(resolve_device(t.device), amp=t.amp, channels_last=t.channels_last, compile=t.compile)
    device = engine.device
    net = net.to(device)
    bn_params = freeze_for_scoring(net, p.freeze_bn)
    scored = ScoredNetwork(net, scaled_scores(net), p.density, after_scope(cfg), p.min_layer_density,
                           p.keep_count).to(device)
    optimizer = torch.optim.SGD(list(scored.scores) + bn_params, lr=p.hydra_lr, momentum=t.momentum,
                                weight_decay=p.hydra_weight_decay)
    x_train, y_train = (v.to(device) for v in load_split(cfg, "train"))
    x_val, y_val = (v.to(device) for v in load_split(cfg, "val"))
    obj_cfg = copy.deepcopy(cfg)
    obj_cfg.train.method = p.hydra_objective
    model = engine.prepare_model(scored)
    objective = build_objective(model, obj_cfg)
    if p.hydra_pre_forward:
        objective = _with_pre_forward(objective, model)
    batch = min(t.batch_size, len(y_train))
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    return _ScoreStage(cfg, out, engine, net, scored, optimizer, objective, (x_train, y_train, x_val, y_val), batch,
                       len(y_train) // batch, scored.mask)


def _with_pre_forward(objective, model: nn.Module):
    """HYDRA's trainer/adv.py runs ``output = model(images)`` in train mode before ``trades_loss``: its only effect
    on training is that BN running statistics take one momentum step towards the batch before the eval-mode attack
    (the output is used for logged accuracy only, never in the loss). No graph is kept: values are the same."""
    step = objective.step

    def pre_forward_step(x, y):
        with torch.no_grad():
            model(x)
        return step(x, y)
    return dataclasses.replace(objective, step=pre_forward_step)


def _resume(st: _ScoreStage) -> tuple[int, int, dict | None, float, bool]:
    """(epoch, step, partial-epoch sums, seconds spent, resumed) from the stage's last checkpoint, if any."""
    handle = os.path.join(st.out, "checkpoints", "last.json")
    if not os.path.exists(handle):
        return 0, 0, None, 0.0, False
    device = st.engine.device
    tensors, meta = load_checkpoint(handle)
    with torch.no_grad():
        for name, s in st.scored.score_dict().items():
            s.copy_(tensors[f"scores.{name}"])
    st.net.load_state_dict({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model.")})
    load_optimizer(st.optimizer, {k: v.to(device) for k, v in tensors.items()}, meta["optimizer_param_groups"])
    st.engine.load_state_dict(meta.get("engine"))
    st.scored.select()
    return meta["epoch"], meta["step"], meta["epoch_sums"], meta["seconds"], True


def _score_epoch(st: _ScoreStage, epoch: int, first: int, sums: dict | None, guard, clock: float,
                 progress: bool) -> dict:
    """Steps ``first``.. of one epoch of the stage, then its metrics row (validation included)."""
    p, t = st.cfg.prune, st.cfg.train
    started = time.perf_counter()
    saved = sums if first and sums else None
    counts = StepCounts(st.engine.device, saved["acc"] if saved else None)
    if saved:
        started -= saved["seconds"]

    def step_checkpoint(next_step: int) -> None:
        epoch_sums = {"acc": counts.as_list(), "seconds": time.perf_counter() - started}
        guard.check(epoch_sums["acc"], epoch, next_step)
        st.checkpoint(epoch, next_step, epoch_sums, time.perf_counter() - clock)

    x_train, y_train, x_val, y_val = st.data
    st.scored.train()
    with progress_bar(total=st.steps_per_epoch, initial=first, desc=f"HYDRA scores {epoch + 1}/{p.hydra_epochs}",
                      enabled=progress, unit="step") as bar:
        batches = seeded_batches(x_train, y_train, p.seed, epoch, first, st.steps_per_epoch, st.batch,
                                 st.cfg.data.crop_padding, st.cfg.data.flip, st.engine, kill_step())
        lr = run_steps(batches, st.engine, st.objective, st.optimizer, counts, st.lr, after_step=st.scored.select,
                       bar=bar, every=t.checkpoint_every_steps, on_checkpoint=step_checkpoint,
                       steps_per_epoch=st.steps_per_epoch)
    totals = counts.as_list()
    guard.check(totals[:2], epoch, st.steps_per_epoch)
    metrics = StepCounts.row(totals)
    row = {"epoch": epoch, "step": (epoch + 1) * st.steps_per_epoch, "lr": lr, "train_loss": metrics.pop("train_loss"),
           **metrics, "seconds": time.perf_counter() - started,
           "mask_kept_from_lwm": _overlap(st.scored.mask, st.initial_mask)}
    if len(y_val):
        attack = f"pgd-{t.val_attack_steps}"
        res = evaluate(st.scored, x_val, y_val, suite=f"clean,{attack}", eps=st.cfg.attack.eps,
                       norm=st.cfg.attack.norm, num_classes=int(y_train.max()) + 1, progress=False, run_checks=False)
        row.update(val_clean_acc=res.accuracy["clean"], val_robust_acc=res.accuracy[attack],
                   val_attack=res.attacks[attack])
    return row


def score_stage(cfg, net: nn.Module, out: str, progress: bool = True) -> tuple[Mask, dict[str, Tensor], dict]:
    """Run, resume or read back the score stage of the pre-trained ``net`` (modified: its BN trains) in the folder
    ``out``. Returns (final mask, the network's state dict, {"epochs", "seconds"})."""
    epochs = cfg.prune.hydra_epochs
    st = _setup(cfg, net, out)
    start_epoch, start_step, sums, spent, resumed = _resume(st)
    if start_epoch >= epochs:  # finished earlier: read back
        return st.scored.mask, st.net.state_dict(), {"epochs": epochs, "seconds": spent}
    log = MetricsLog(out, resume_epoch=start_epoch if resumed else 0, purge_step=start_epoch * st.steps_per_epoch)
    write_status(out, status="running", stage="hydra scores", device=str(st.engine.device))
    guard = TrainingGuard(out, cfg.train, int(st.data[1].max()) + 1, st.scored)  # divergence (scores, BN too)
    clock = time.perf_counter() - spent
    for epoch in range(start_epoch, epochs):
        row = _score_epoch(st, epoch, start_step if epoch == start_epoch else 0, sums, guard, clock, progress)
        log.append(row, row["step"])
        if progress:
            print(_summary(row, epochs), file=sys.stderr, flush=True)
        st.checkpoint(epoch + 1, 0, None, time.perf_counter() - clock)
    log.close()
    st.scored.mask.save(os.path.join(out, MASK_FILE))
    seconds = time.perf_counter() - clock
    write_status(out, status="finished", stage="hydra scores", epochs=epochs, seconds=seconds)
    return st.scored.mask, st.net.state_dict(), {"epochs": epochs, "seconds": seconds}


def _overlap(mask: Mask, reference: Mask) -> float:
    """Fraction of the weights kept by ``mask`` that ``reference`` keeps too."""
    both = sum(int((mask[k] * reference[k].to(mask[k].device)).sum()) for k in mask.keys())
    return both / max(1, mask.kept())


def _summary(row: dict, epochs: int) -> str:
    parts = [f"HYDRA scores epoch {row['epoch'] + 1}/{epochs}", f"loss {row['train_loss']:.4f}",
             f"kept from LWM {row['mask_kept_from_lwm']:.1%}"]
    if "val_robust_acc" in row:
        parts.append(f"val clean {row['val_clean_acc']:.2%}, val robust {row['val_robust_acc']:.2%} "
                     f"({row['val_attack']})")
    return " | ".join(parts + [f"{row['seconds']:.1f}s"])


@register_after_training("hydra")
def pipeline(pipe) -> list[Outcome]:
    """Pre-trained dense run → score stage (scores/) → ticket (ticket/) → fine-tune (finetune/)."""
    ticket_dir = pipe.path("ticket")
    if pipe.has_ticket(ticket_dir):
        cost = pipe.read_stage_cost("scores")
    else:
        pipe.say(f"HYDRA score stage ({pipe.cfg.prune.hydra_epochs} epochs, {pipe.cfg.prune.hydra_objective})")
        mask, state, cost = score_stage(pipe.cfg, pipe.pretrained_model(), pipe.path("scores"), pipe.progress)
        pipe.write_stage_cost("scores", cost)
        pipe.write_ticket(ticket_dir, state, mask, {"method": "hydra", "stage_seconds": cost["seconds"]})
    run_dir, finetune_cost = pipe.finetune(ticket_dir, pipe.path("finetune"))
    stages = [pipe.pretrain_cost(), {"stage": "hydra scores", **cost}, finetune_cost]
    return [Outcome(pipe.densities[0], run_dir, stages)]
