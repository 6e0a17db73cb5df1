"""The training loop for every dense objective (standard, PGD-AT, TRADES), readable in one go.

Data live on the training device as one tensor; each step draws its batch from a per-epoch permutation and is
augmented on the device. Randomness is a pure function of (seed, epoch, step): the permutation, the augmentation
and the global RNG (attack random starts, dropout) are all re-seeded from it, so resuming from a checkpoint taken
at any step boundary reproduces the uninterrupted run exactly. Losses and accuracy counts accumulate on the device
and are read once per epoch. Validation (clean + PGD-k on the held-out val split) picks the ``best`` checkpoint;
``last`` is saved every epoch (and every ``checkpoint_every_steps``).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import yaml

from ..config import RunConfig, config_from_dict
from ..data import augment, dataset_spec, load_dataset
from ..errors import UserError
from ..models import build_model
from ..utils.progress import progress_bar
from ..pipelines.ticket import load_model_state
from ..runs.atomic import holds_nothing_but, write_yaml_atomic
from ..runs.checkpoint import newest_intact, save_checkpoint
from ..runs.logger import MetricsLog, write_status
from .distributed import RowsOnly
from .engine import Engine
from .guards import TrainingGuard
from .objectives.base import build_objective
from .schedule import lr_at

KILL_AT_STEP_ENV = "ROBUSTSPARSE_KILL_AT_STEP"  # fault injection for resume tests: SIGKILL self at this global step


@dataclass
class TrainResult:
    run_dir: str
    best_val_robust: float | None
    last_epoch: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def step_seed(seed: int, epoch: int, step: int) -> int:
    return ((seed * 1_000_003 + epoch) * 100_003 + step) % (2**63 - 1)


def model_spec(cfg: RunConfig) -> dict:
    """Everything needed to rebuild the architecture; stored in every checkpoint."""
    spec = dataset_spec(cfg.data.name, **cfg.data.options)
    return {"name": cfg.model.name, "in_channels": spec.channels, "num_classes": spec.num_classes,
            "input_size": list(spec.size), "mean": cfg.model.mean, "std": cfg.model.std,
            "options": dict(cfg.model.options), **_ofa_spec(cfg)}


def _ofa_spec(cfg: RunConfig) -> dict:
    from ..ofa import ofa_spec  # once-for-all methods (oat, float, smart) add their options to the spec
    return ofa_spec(cfg)


def build_from_spec(spec: dict) -> torch.nn.Module:
    model = build_model(spec["name"], spec["in_channels"], spec["num_classes"], tuple(spec["input_size"]),
                        mean=spec["mean"], std=spec["std"], **spec["options"])
    if "ofa" in spec:  # a once-for-all model: the registry model converted in place (robustsparse/ofa/)
        from ..ofa import make_conditional
        model = make_conditional(model, spec["ofa"])
    return model


def load_split(cfg: RunConfig, split: str):
    kwargs = {} if cfg.data.val_size is None else {"val_size": cfg.data.val_size}
    return load_dataset(cfg.data.name, split, root=cfg.data.root, **kwargs, **cfg.data.options)


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


def _optimizer_tensors(optimizer) -> tuple[dict, list]:
    sd = optimizer.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    return tensors, sd["param_groups"]


def _load_optimizer(optimizer, tensors: dict, param_groups: list) -> None:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


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
    from ..pipelines.ticket import load_ticket
    state, meta = load_ticket(path)
    if meta["model_spec"] != spec:
        raise UserError(f"ticket {path} was found for {meta['model_spec']}, but this run builds {spec}; "
                        "use the same data and model settings as the prune run")
    load_model_state(model, {k: v.to(next(model.parameters()).device) for k, v in state.items()})


def train(cfg: RunConfig | None, out: str, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train one dense model as ``cfg`` says and write the run folder ``out`` (see docs/architecture.md)."""
    cfg = run_config(out, cfg, resume)
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
    recorder = None
    if t.probe_every:  # probe from the dense θ₀ (the model as built, before any ticket is loaded)
        from ..analysis.dynamics import DynamicsRecorder, make_probe
        probe = make_probe(cfg, model)
    if t.ticket is not None:  # the mask's own hooks keep pruned weights exactly 0 through every step
        _start_from_ticket(model, t.ticket, spec)
    objective = build_objective(engine.prepare_model(model), cfg)  # `model` stays the plain module we checkpoint
    if not resume and engine.is_main:  # only now: data and model are known to load, so a bad config leaves no folder
        create_run_dir(out, cfg)

    n = len(y_train)
    batch = min(t.batch_size, n)
    steps_per_epoch = n // batch  # drop the ragged last batch: every step sees a full batch (BN-friendly)
    total_steps = steps_per_epoch * t.epochs
    warmup_steps = round(t.warmup_epochs * steps_per_epoch)

    start_epoch, start_step, best, sums = 0, 0, None, None
    ckpt_dir = os.path.join(out, "checkpoints")
    found = newest_intact(ckpt_dir) if resume else None  # 'last', or the newest intact one if 'last' is damaged
    if found is not None:
        tensors, meta, handle, problems = found
        for problem in problems:
            print(f"warning: {problem}; resuming from {handle} (epoch {meta['epoch']}, step {meta['step']})",
                  file=sys.stderr, flush=True)
        load_model_state(model, {k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model.")})
        _load_optimizer(optimizer, {k: v.to(device) for k, v in tensors.items()}, meta["optimizer_param_groups"])
        start_epoch, start_step, best, sums = meta["epoch"], meta["step"], meta["best"], meta["epoch_sums"]
        engine.load_state_dict(meta.get("engine"))
    if t.probe_every and engine.is_main:
        recorder = DynamicsRecorder(out, probe)
        if start_epoch == 0 and start_step == 0:
            recorder.record(model, 0)
    log = (MetricsLog if engine.is_main else RowsOnly)(out, resume_epoch=start_epoch if resume else None,
                                                       purge_step=start_epoch * steps_per_epoch if resume else None)
    if engine.is_main:
        write_status(out, status="running", device=str(device), torch=torch.__version__, engine=engine.describe())

    def checkpoint(label, epoch, step, epoch_sums):
        if not engine.is_main:  # every rank holds the same model and optimizer state; one writes it
            return
        tensors, groups = _optimizer_tensors(optimizer)
        tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
        save_checkpoint(ckpt_dir, label, tensors, {
            "epoch": epoch, "step": step, "global_step": epoch * steps_per_epoch + step, "best": best,
            "epoch_sums": epoch_sums, "model_spec": spec, "config": cfg.to_dict(),
            "optimizer_param_groups": groups, "eval_eps": cfg.attack.eps, "eval_norm": cfg.attack.norm,
            "engine": engine.state_dict()})

    guard = TrainingGuard(out, t, spec["num_classes"], model, writes=engine.is_main)  # divergence, overfitting
    if found is not None and found[3]:  # resumed from an older checkpoint: replace the damaged 'last' right away
        checkpoint("last", start_epoch, start_step, sums)
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "-1"))
    for epoch in range(start_epoch, t.epochs):
        started = time.perf_counter()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(t.seed, epoch, -1))).to(device)
        acc = torch.zeros(4, device=device, dtype=torch.float64)  # loss·n, n, clean correct, adv correct
        first = start_step if epoch == start_epoch else 0
        if first and sums:
            if engine.is_main:  # the saved sums are over all ranks: count them once
                acc += torch.tensor(sums["acc"], device=device, dtype=torch.float64)
            started -= sums["seconds"]
        model.train()
        with progress_bar(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{t.epochs}",
                          enabled=progress and engine.is_main, unit="step") as bar:
            for step in range(first, steps_per_epoch):
                global_step = epoch * steps_per_epoch + step
                if global_step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                seed = step_seed(t.seed, epoch, step)
                torch.manual_seed(engine.rank_seed(seed))  # attack random starts, dropout
                idx = perm[step * batch:(step + 1) * batch]
                gen = torch.Generator(device=device).manual_seed(seed)
                xb = augment(x_train[idx], cfg.data.crop_padding, cfg.data.flip, generator=gen)
                yb = y_train[idx]
                xb, yb = engine.shard(xb), engine.shard(yb)  # this rank's slice of the global batch (DDP)
                lr = lr_at(global_step, total_steps, t.lr, t.schedule, warmup_steps, t.milestones)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with engine.autocast():
                    out_step = objective(engine.layout(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                engine.backward(out_step.loss)
                engine.optimizer_step(optimizer)
                acc[0] += out_step.loss.detach() * len(yb)
                acc[1] += len(yb)
                if out_step.correct_clean is not None:
                    acc[2] += out_step.correct_clean
                if out_step.correct_adv is not None:
                    acc[3] += out_step.correct_adv
                bar.update(1)
                if t.checkpoint_every_steps and (global_step + 1) % t.checkpoint_every_steps == 0 \
                        and step + 1 < steps_per_epoch:
                    epoch_sums = {"acc": engine.sum_over_ranks(acc).tolist(),
                                  "seconds": time.perf_counter() - started}
                    guard.check(epoch_sums["acc"], epoch, step + 1)
                    checkpoint("last", epoch, step + 1, epoch_sums)

        loss_sum, seen, clean_ok, adv_ok = engine.sum_over_ranks(acc).tolist()
        guard.check([loss_sum, seen], epoch, steps_per_epoch)  # before validation and before any checkpoint
        row = {"epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "lr": lr, "train_loss": loss_sum / seen,
               "seconds": time.perf_counter() - started}
        if t.method in ("standard", "trades"):
            row["train_clean_acc"] = clean_ok / seen
        if t.method in ("pgd_at", "trades", "fgsm_at"):
            row["train_adv_acc"] = adv_ok / seen
        is_best = False
        if len(y_val) and ((epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs):
            from ..ofa import validation_extra, validation_model  # once-for-all models: validated at λ = 1
            row.update(validation_extra(model, x_val, y_val))  # ... plus clean accuracy at λ = 0
            res = engine.evaluate(validation_model(model), x_val, y_val, suite=f"clean,pgd-{t.val_attack_steps}",
                                  eps=cfg.attack.eps, norm=cfg.attack.norm, num_classes=spec["num_classes"],
                                  progress=False, run_checks=False)
            row["val_clean_acc"] = res.accuracy["clean"]
            row["val_robust_acc"] = res.accuracy[f"pgd-{t.val_attack_steps}"]
            row["val_attack"] = res.attacks[f"pgd-{t.val_attack_steps}"]
            score = row["val_clean_acc"] if t.method == "standard" else row["val_robust_acc"]
            if best is None or score > best["score"]:
                best = {"score": score, "epoch": epoch,
                        "metric": "val_clean_acc" if t.method == "standard" else "val_robust_acc"}
                is_best = True
        stop = guard.after_validation(row, log.rows)  # flags catastrophic overfitting in the row
        log.append(row, row["step"])
        if progress and engine.is_main:
            print(_summary(row, t.epochs), file=sys.stderr, flush=True)
        if stop:  # train.on_overfit=stop: before this epoch's best/last, so 'last' stays the last good state
            guard.stop_overfit(row)
        if recorder is not None and engine.is_main and ((epoch + 1) % t.probe_every == 0 or epoch + 1 == t.epochs):
            recorder.record(model, epoch + 1)
        if is_best:
            checkpoint("best", epoch + 1, 0, None)
        if epoch + 1 in t.keep_epochs:  # a rewinding point (IMP); written before last so a kill cannot skip it
            checkpoint(f"epoch-{epoch + 1}", epoch + 1, 0, None)
        checkpoint("last", epoch + 1, 0, None)
        if engine.is_main:
            from ..runs.plots import plot_curves
            plot_curves(log.rows, os.path.join(out, "curves.png"))
    log.close()
    if engine.is_main:
        write_status(out, status="finished", epochs=t.epochs)
    engine.close()
    return TrainResult(out, None if best is None else best["score"], t.epochs - 1)
