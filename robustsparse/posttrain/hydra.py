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
from a ticket (the mask, W ⊙ m, and the stage's BN): see ``pipeline`` below and robustsparse/posttrain.py.

``prune.scope=global`` ranks all layers together instead (our option; HYDRA is per layer). Per-layer counts are
``round(k · n)`` (HYDRA: ``n − int((1 − k) · n)``), with the layer-collapse guard of ``masks_from_scores``.

Resumable exactly like the trainer: each step is seeded from (prune.seed, epoch, step); the scores, the network
(BN parameters and statistics), the optimizer and the partial-epoch sums are checkpointed every
``train.checkpoint_every_steps`` steps and at each epoch end; ``ROBUSTSPARSE_KILL_AT_STEP`` SIGKILLs the process
at that global step of the stage, so tests can kill it and check that the resumed stage ends with the same mask.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..data import augment
from ..eval import evaluate
from ..utils.progress import progress_bar
from ..runs.checkpoint import load_checkpoint, save_checkpoint
from ..runs.logger import MetricsLog, write_status
from ..sparse import Mask, masks_from_scores, prunable_parameters
from ..train.objectives.base import build_objective
from ..train.schedule import lr_at
from ..train.trainer import (KILL_AT_STEP_ENV, _load_optimizer, _optimizer_tensors, load_split, resolve_device,
                             step_seed)
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
                 min_layer_density: float = 0.0):
        super().__init__()
        self.net = net
        self.names = list(scores)
        self.scores = nn.ParameterList([nn.Parameter(scores[n].detach().clone()) for n in self.names])
        self.density, self.scope, self.min_layer_density = density, scope, min_layer_density
        self._weights = prunable_parameters(net)
        self.mask: Mask | None = None
        self.select()

    def score_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.scores))

    def select(self) -> Mask:
        self.mask = masks_from_scores({n: s.detach().abs() for n, s in self.score_dict().items()}, self.density,
                                      self.scope, self.min_layer_density)
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


def score_stage(cfg, net: nn.Module, out: str, progress: bool = True) -> tuple[Mask, dict[str, Tensor], dict]:
    """Run, resume or read back the score stage of the pre-trained ``net`` (modified: its BN trains) in the folder
    ``out``. Returns (final mask, the network's state dict, {"epochs", "seconds"})."""
    p, t = cfg.prune, cfg.train
    device = resolve_device(t.device)
    net = net.to(device)
    bn_params = freeze_for_scoring(net, p.freeze_bn)
    scored = ScoredNetwork(net, scaled_scores(net), p.density, after_scope(cfg), p.min_layer_density).to(device)
    initial_mask = scored.mask
    optimizer = torch.optim.SGD(list(scored.scores) + bn_params, lr=p.hydra_lr, momentum=t.momentum,
                                weight_decay=p.hydra_weight_decay)
    x_train, y_train = (v.to(device) for v in load_split(cfg, "train"))
    x_val, y_val = (v.to(device) for v in load_split(cfg, "val"))
    obj_cfg = copy.deepcopy(cfg)
    obj_cfg.train.method = p.hydra_objective
    objective = build_objective(scored, obj_cfg)
    n = len(y_train)
    batch = min(t.batch_size, n)
    steps_per_epoch = n // batch
    total_steps = steps_per_epoch * p.hydra_epochs
    ckpt_dir = os.path.join(out, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)

    start_epoch, start_step, sums, spent = 0, 0, None, 0.0
    handle = os.path.join(ckpt_dir, "last.json")
    resumed = os.path.exists(handle)
    if resumed:
        tensors, meta = load_checkpoint(handle)
        with torch.no_grad():
            for name, s in scored.score_dict().items():
                s.copy_(tensors[f"scores.{name}"])
        net.load_state_dict({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model.")})
        _load_optimizer(optimizer, {k: v.to(device) for k, v in tensors.items()}, meta["optimizer_param_groups"])
        start_epoch, start_step, sums, spent = meta["epoch"], meta["step"], meta["epoch_sums"], meta["seconds"]
        scored.select()
    if start_epoch >= p.hydra_epochs:  # finished earlier: read back
        return scored.mask, net.state_dict(), {"epochs": p.hydra_epochs, "seconds": spent}

    log = MetricsLog(out, resume_epoch=start_epoch if resumed else 0, purge_step=start_epoch * steps_per_epoch)
    write_status(out, status="running", stage="hydra scores", device=str(device))
    clock = time.perf_counter() - spent

    def checkpoint(epoch, step, epoch_sums):
        tensors, groups = _optimizer_tensors(optimizer)
        tensors.update({f"scores.{k}": v for k, v in scored.score_dict().items()})
        tensors.update({f"model.{k}": v for k, v in net.state_dict().items()})
        save_checkpoint(ckpt_dir, "last", tensors, {
            "epoch": epoch, "step": step, "epoch_sums": epoch_sums, "seconds": time.perf_counter() - clock,
            "optimizer_param_groups": groups, "config": cfg.to_dict()})

    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "-1"))
    for epoch in range(start_epoch, p.hydra_epochs):
        started = time.perf_counter()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(p.seed, epoch, -1))).to(device)
        acc = torch.zeros(4, device=device, dtype=torch.float64)  # loss·n, n, clean correct, adv correct
        first = start_step if epoch == start_epoch else 0
        if first and sums:
            acc += torch.tensor(sums["acc"], device=device, dtype=torch.float64)
            started -= sums["seconds"]
        scored.train()
        with progress_bar(total=steps_per_epoch, initial=first, desc=f"HYDRA scores {epoch + 1}/{p.hydra_epochs}",
                          enabled=progress, unit="step") as bar:
            for step in range(first, steps_per_epoch):
                global_step = epoch * steps_per_epoch + step
                if global_step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                seed = step_seed(p.seed, epoch, step)
                torch.manual_seed(seed)
                idx = perm[step * batch:(step + 1) * batch]
                gen = torch.Generator(device=device).manual_seed(seed)
                xb = augment(x_train[idx], cfg.data.crop_padding, cfg.data.flip, generator=gen)
                yb = y_train[idx]
                lr = lr_at(global_step, total_steps, p.hydra_lr, t.schedule, 0, t.milestones)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                result = objective(xb, yb)
                optimizer.zero_grad(set_to_none=True)
                result.loss.backward()
                optimizer.step()
                scored.select()
                acc[0] += result.loss.detach() * len(yb)
                acc[1] += len(yb)
                if result.correct_clean is not None:
                    acc[2] += result.correct_clean
                if result.correct_adv is not None:
                    acc[3] += result.correct_adv
                bar.update(1)
                if t.checkpoint_every_steps and (global_step + 1) % t.checkpoint_every_steps == 0 \
                        and step + 1 < steps_per_epoch:
                    checkpoint(epoch, step + 1, {"acc": acc.tolist(), "seconds": time.perf_counter() - started})
        loss_sum, seen, clean_ok, adv_ok = acc.tolist()
        row = {"epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "lr": lr, "train_loss": loss_sum / seen,
               "train_adv_acc": adv_ok / seen, "seconds": time.perf_counter() - started,
               "mask_kept_from_lwm": _overlap(scored.mask, initial_mask)}
        if p.hydra_objective == "trades":
            row["train_clean_acc"] = clean_ok / seen
        if len(y_val):
            res = evaluate(scored, x_val, y_val, suite=f"clean,pgd-{t.val_attack_steps}", eps=cfg.attack.eps,
                           norm=cfg.attack.norm, num_classes=int(y_train.max()) + 1, progress=False,
                           run_checks=False)
            row.update(val_clean_acc=res.accuracy["clean"], val_robust_acc=res.accuracy[f"pgd-{t.val_attack_steps}"],
                       val_attack=res.attacks[f"pgd-{t.val_attack_steps}"])
        log.append(row, row["step"])
        if progress:
            print(_summary(row, p.hydra_epochs), file=sys.stderr, flush=True)
        checkpoint(epoch + 1, 0, None)
    log.close()
    scored.mask.save(os.path.join(out, MASK_FILE))
    seconds = time.perf_counter() - clock
    write_status(out, status="finished", stage="hydra scores", epochs=p.hydra_epochs, seconds=seconds)
    return scored.mask, net.state_dict(), {"epochs": p.hydra_epochs, "seconds": seconds}


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
