"""Training a run: every objective (standard, PGD-AT, TRADES, FGSM-AT, the once-for-all methods), dense or from a
ticket. The step loop itself is train/loop.py (shared with HYDRA's score stage and bench).

Data live on the training device as one tensor; each step draws its batch from a per-epoch permutation and is
augmented on the device. Randomness is a pure function of (seed, epoch, step): the permutation, the augmentation
and the global RNG (attack random starts, dropout) are all re-seeded from it, so resuming from a checkpoint taken
at any step boundary reproduces the uninterrupted run exactly. Losses and accuracy counts accumulate on the device
and are read once per epoch. Validation (clean + PGD-k on the held-out val split) picks the ``best`` checkpoint;
``last`` is saved every epoch (and every ``checkpoint_every_steps``).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import yaml

from ..analysis.dynamics import DynamicsRecorder, make_probe
from ..config import RunConfig, config_from_dict
from ..data import load_split
from ..errors import UserError
from ..runs.atomic import holds_nothing_but, write_yaml_atomic
from ..runs.checkpoint import load_optimizer, newest_intact, optimizer_tensors, save_checkpoint
from ..runs.logger import MetricsLog, write_status
from ..runs.plots import plot_curves
from ..sparse import load_model_state
from ..sparse.ticket import load_ticket, ticket_summary
from ..utils.device import resolve_device
from ..utils.progress import progress_bar
from .distributed import RowsOnly
from .engine import Engine
from .guards import TrainingGuard
from .loop import StepCounts, kill_step, run_steps, seeded_batches
from .objectives import Objective, build_objective
from .schedule import lr_at
from .spec import build_from_spec, model_spec


@dataclass
class TrainResult:
    run_dir: str
    best_val_robust: float | None  # the best checkpoint's validation score (the objective's ``selects_on``)


def run_config(out: str, cfg: RunConfig | None, resume: bool) -> RunConfig:
    """The config to train with: the run's own on resume (a different one is refused), else ``cfg`` for a new,
    empty folder (an existing run is never overwritten)."""
    config_path = os.path.join(out, "config.yaml")
    if resume:
        if not os.path.exists(config_path):
            raise UserError(f"--resume: {out} holds no run (config.yaml missing)")
        with open(config_path) as fh:
            saved = config_from_dict(yaml.safe_load(fh))
        if cfg is not None and cfg.to_dict() != saved.to_dict():
            raise UserError(f"--resume: the given config differs from the one {out} was started with; "
                            "resume with the run's own config (omit CONFIG) or start a new run with another --out")
        return saved
    if cfg is None:
        raise UserError("a new run needs a config")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out} exists and is a file, not a run folder")
    if not holds_nothing_but(out, "config.yaml"):
        raise UserError(f"{out} already exists and is not empty; use --resume to continue it or pick another --out")
    return cfg


def create_run_dir(out: str, cfg: RunConfig) -> None:
    # config.yaml first and atomically: a kill before it leaves an empty folder (a new run may use it), a kill
    # after it leaves a run that --resume continues; never a folder that neither accepts.
    os.makedirs(out, exist_ok=True)
    write_yaml_atomic(os.path.join(out, "config.yaml"), cfg.to_dict())
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)


def _summary(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch'] + 1}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if "train_adv_acc" in row:
        parts.append(f"train adv acc {row['train_adv_acc']:.2%}")
    if "val_clean_acc" in row:
        parts.append(f"val clean {row['val_clean_acc']:.2%}, val robust {row['val_robust_acc']:.2%} "
                     f"({row['val_attack']})")
    return " | ".join(parts + [f"{row['seconds']:.1f}s"])


def _start_from_ticket(model, path: str, spec: dict) -> None:
    """Load a ticket's mask and initial weights into ``model``; refuse a ticket for another architecture."""
    state, meta = load_ticket(path)
    if meta["model_spec"] != spec:
        raise UserError(f"ticket {path} was found for {meta['model_spec']}, but this run builds {spec}; "
                        "use the same data and model settings as the prune run")
    load_model_state(model, {k: v.to(next(model.parameters()).device) for k, v in state.items()})


@dataclass
class _Run:
    """What one training run holds, built by ``_prepare``."""
    cfg: RunConfig
    out: str
    engine: Engine
    model: torch.nn.Module  # the plain module: checkpoints, validation and the optimizer use it
    optimizer: torch.optim.Optimizer
    objective: Objective
    spec: dict
    data: tuple  # x_train, y_train, x_val, y_val on the device
    probe: torch.Tensor | None
    batch: int
    steps_per_epoch: int

    def lr(self, global_step: int) -> float:
        t = self.cfg.train
        return lr_at(global_step, self.steps_per_epoch * t.epochs, t.lr, t.schedule,
                     round(t.warmup_epochs * self.steps_per_epoch), t.milestones)


def _prepare(cfg: RunConfig, out: str, resume: bool) -> _Run:
    """Engine, data, θ₀ (seeded), optimizer, probe, ticket and objective, in this order; the folder only after all
    of them succeeded, so a bad config leaves nothing behind."""
    t = cfg.train
    engine = Engine.from_train_config(t, resolve_device(t.device))  # AMP, channels_last, compile, DDP (engine.py)
    device = engine.device
    x_train, y_train = (v.to(device) for v in load_split(cfg, "train"))
    x_val, y_val = (v.to(device) for v in load_split(cfg, "val"))
    spec = model_spec(cfg)
    torch.manual_seed(t.seed)
    model = build_from_spec(spec).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                                weight_decay=t.weight_decay)
    # the probe comes from the dense θ₀ (the model as built, before any ticket is loaded)
    probe = make_probe(cfg, model) if t.probe_every else None
    if t.ticket is not None:  # the mask's own hooks keep pruned weights exactly 0 through every step
        _start_from_ticket(model, t.ticket, spec)
    objective = build_objective(engine.prepare_model(model), cfg)  # `model` stays the plain module we checkpoint
    if not resume and engine.is_main:
        create_run_dir(out, cfg)
    batch = min(t.batch_size, len(y_train))
    # drop the ragged last batch: every step sees a full batch (BN-friendly)
    return _Run(cfg, out, engine, model, optimizer, objective, spec, (x_train, y_train, x_val, y_val), probe,
                batch, len(y_train) // batch)


class Checkpointer:
    """Writes the run's checkpoints (rank 0 only: every rank holds the same model and optimizer state) and holds
    ``best``, the record of the best validation score so far."""

    def __init__(self, run: _Run):
        self.run, self.dir, self.best = run, os.path.join(run.out, "checkpoints"), None

    def save(self, label: str, epoch: int, step: int, epoch_sums: dict | None) -> None:
        r = self.run
        if not r.engine.is_main:
            return
        tensors, groups = optimizer_tensors(r.optimizer)
        tensors.update({f"model.{k}": v for k, v in r.model.state_dict().items()})
        save_checkpoint(self.dir, label, tensors, {
            "epoch": epoch, "step": step, "global_step": epoch * r.steps_per_epoch + step, "best": self.best,
            "epoch_sums": epoch_sums, "model_spec": r.spec, "config": r.cfg.to_dict(),
            "optimizer_param_groups": groups, "eval_eps": r.cfg.attack.eps, "eval_norm": r.cfg.attack.norm,
            "engine": r.engine.state_dict()})

    def resume(self) -> tuple[int, int, dict | None, bool]:
        """Load the checkpoint with the most progress that verifies: (epoch, step, partial-epoch sums, whether it
        was another than 'last').

        Another one is chosen when 'last' is damaged, or when a kill landed between an epoch's 'best' (or
        'epoch-k') and its 'last': then 'best' is one epoch ahead of 'last'. Either way the caller rewrites 'last'
        from the loaded state at once; otherwise a run whose final epoch ended so would finish with 'last' an
        epoch behind."""
        found = newest_intact(self.dir)
        if found is None:
            return 0, 0, None, False
        r, device = self.run, self.run.engine.device
        tensors, meta, handle, problems = found
        for problem in problems:
            print(f"warning: {problem}; resuming from {handle} (epoch {meta['epoch']}, step {meta['step']})",
                  file=sys.stderr, flush=True)
        load_model_state(r.model, {k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model.")})
        load_optimizer(r.optimizer, {k: v.to(device) for k, v in tensors.items()}, meta["optimizer_param_groups"])
        self.best = meta["best"]
        r.engine.load_state_dict(meta.get("engine"))
        return meta["epoch"], meta["step"], meta["epoch_sums"], bool(problems) or meta.get("label") != "last"


def _train_epoch(r: _Run, epoch: int, first: int, sums: dict | None, guard, ckpt: Checkpointer,
                 progress: bool) -> dict:
    """Steps ``first``.. of ``epoch`` (continuing the saved partial sums), then the epoch's metrics row."""
    t, engine = r.cfg.train, r.engine
    started = time.perf_counter()
    saved = sums if first and sums else None
    counts = StepCounts(engine.device, saved["acc"] if saved and engine.is_main else None)  # global sums: once
    if saved:
        started -= saved["seconds"]

    def step_checkpoint(next_step: int) -> None:
        epoch_sums = {"acc": counts.as_list(engine), "seconds": time.perf_counter() - started}
        guard.check(epoch_sums["acc"], epoch, next_step)
        ckpt.save("last", epoch, next_step, epoch_sums)

    x_train, y_train = r.data[:2]
    r.model.train()
    with progress_bar(total=r.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{t.epochs}",
                      enabled=progress and engine.is_main, unit="step") as bar:
        batches = seeded_batches(x_train, y_train, t.seed, epoch, first, r.steps_per_epoch, r.batch,
                                 r.cfg.data.crop_padding, r.cfg.data.flip, engine, kill_step())
        lr = run_steps(batches, engine, r.objective, r.optimizer, counts, r.lr, bar=bar,
                       every=t.checkpoint_every_steps, on_checkpoint=step_checkpoint,
                       steps_per_epoch=r.steps_per_epoch)
    totals = counts.as_list(engine)
    guard.check(totals[:2], epoch, r.steps_per_epoch)  # before validation and before any checkpoint
    metrics = StepCounts.row(totals)
    row = {"epoch": epoch, "step": (epoch + 1) * r.steps_per_epoch, "lr": lr, "train_loss": metrics.pop("train_loss"),
           "seconds": time.perf_counter() - started}
    row.update(metrics)  # train_clean_acc / train_adv_acc: whichever the objective counted
    return row


def _validate(r: _Run, row: dict, epoch: int, ckpt: Checkpointer) -> bool:
    """Validation (clean + PGD-k on the val split, through the objective's hooks) into ``row``; True if this epoch
    is the new best by the objective's ``selects_on``."""
    t, (x_val, y_val) = r.cfg.train, r.data[2:]
    if not len(y_val) or not ((epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs):
        return False
    row.update(r.objective.extra_validation(r.model, x_val, y_val))
    attack = f"pgd-{t.val_attack_steps}"
    res = r.engine.evaluate(r.objective.validation_model(r.model), x_val, y_val, suite=f"clean,{attack}",
                            eps=r.cfg.attack.eps, norm=r.cfg.attack.norm, num_classes=r.spec["num_classes"],
                            progress=False, run_checks=False)
    row["val_clean_acc"] = res.accuracy["clean"]
    row["val_robust_acc"] = res.accuracy[attack]
    row["val_attack"] = res.attacks[attack]
    score = row[r.objective.selects_on]
    if ckpt.best is None or score > ckpt.best["score"]:
        ckpt.best = {"score": score, "epoch": epoch, "metric": r.objective.selects_on}
        return True
    return False


def _end_epoch(r: _Run, row: dict, epoch: int, is_best: bool, guard, log, recorder, ckpt: Checkpointer,
               progress: bool) -> None:
    """The overfitting check, the metrics line, the dynamics probe, then best / epoch-k / last and the plot."""
    t, main = r.cfg.train, r.engine.is_main
    stop = guard.after_validation(row, log.rows)  # flags catastrophic overfitting in the row
    log.append(row, row["step"])
    if main:  # one line an epoch even without progress bars: a nohup'd run still says where it is
        print(_summary(row, t.epochs), file=sys.stderr, flush=True)
    if stop:  # train.on_overfit=stop: before this epoch's best/last, so 'last' stays the last good state
        guard.stop_overfit(row)
    if recorder is not None and main and ((epoch + 1) % t.probe_every == 0 or epoch + 1 == t.epochs):
        recorder.record(r.model, epoch + 1)
    if is_best:
        ckpt.save("best", epoch + 1, 0, None)
    if epoch + 1 in t.keep_epochs:  # a rewinding point (IMP); written before last so a kill cannot skip it
        ckpt.save(f"epoch-{epoch + 1}", epoch + 1, 0, None)
    ckpt.save("last", epoch + 1, 0, None)
    if main:
        plot_curves(log.rows, os.path.join(r.out, "curves.png"))


def train(cfg: RunConfig | None, out: str, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train one model as ``cfg`` says and write the run folder ``out`` (see docs/architecture.md)."""
    cfg = run_config(out, cfg, resume)
    r = _prepare(cfg, out, resume)
    t, engine = cfg.train, r.engine
    ckpt = Checkpointer(r)
    start_epoch, start_step, sums, fell_back = ckpt.resume() if resume else (0, 0, None, False)
    recorder = None
    if r.probe is not None and engine.is_main:
        recorder = DynamicsRecorder(out, r.probe)
        if start_epoch == 0 and start_step == 0:
            recorder.record(r.model, 0)
    log = (MetricsLog if engine.is_main else RowsOnly)(out, resume_epoch=start_epoch if resume else None,
                                                       purge_step=start_epoch * r.steps_per_epoch if resume else None)
    if engine.is_main:
        write_status(out, status="running", device=str(engine.device), torch=torch.__version__,
                     engine=engine.describe(), **({"ticket": ticket_summary(t.ticket)} if t.ticket else {}))
    guard = TrainingGuard(out, t, r.spec["num_classes"], r.model, writes=engine.is_main)  # divergence, overfitting
    if fell_back:  # 'last' was damaged or an epoch behind: replace it from the state resumed, right away
        ckpt.save("last", start_epoch, start_step, sums)
        if engine.is_main and log.rows:  # the epoch's end may have been cut before its plot
            plot_curves(log.rows, os.path.join(out, "curves.png"))
    for epoch in range(start_epoch, t.epochs):
        first = start_step if epoch == start_epoch else 0
        row = _train_epoch(r, epoch, first, sums, guard, ckpt, progress)
        is_best = _validate(r, row, epoch, ckpt)
        _end_epoch(r, row, epoch, is_best, guard, log, recorder, ckpt, progress)
    log.close()
    if engine.is_main:
        write_status(out, status="finished", epochs=t.epochs)
    engine.close()
    return TrainResult(out, None if ckpt.best is None else ckpt.best["score"])
