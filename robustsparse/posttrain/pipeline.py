"""After-training pruning pipelines, one command each: robust dense pre-training → prune → (fine-)tune.

    robustsparse posttrain CONFIG [k=v ...] --method {hydra,lwm,imp} --density D --out DIR [--pretrained RUN]

``hydra`` (posttrain/hydra.py), ``lwm`` (posttrain/lwm.py) and ``imp`` (posttrain/imp.py) are registered in
posttrain/after.py. Every stage is resumable and a finished one is never recomputed, so running the same command
again (or ``--resume --out DIR``) continues where it stopped. A different request in the same folder is refused.

    <out>/posttrain.yaml   the request: method, densities, evaluation suite, config, and the pre-trained run
                           (path and the SHA-256 of its best weights)
    <out>/pretrain/        the dense robust run (``train``); absent with --pretrained, which is only read
    <out>/stages.json      epochs and wall seconds of the stages that are not training runs (score stage, prune)
    hydra   scores/        score stage: metrics.jsonl, run.json, checkpoints/last.* (scores, BN, optimizer),
                           mask.safetensors when finished
            ticket/        a ticket folder: the mask, pre-trained weights ⊙ mask and the stage's BN
            finetune/      ``train`` from the ticket (prune.finetune_epochs at prune.finetune_lr); eval.json
    lwm     ticket/, finetune/   as hydra, with the magnitude mask of the pre-trained weights
    imp     round-<r>/ticket/, round-<r>/run/ (r = 1..R; run/round-eval.json), rounds.jsonl (one line per round)
    <out>/cost.json        per requested density: every stage's epochs and wall seconds, and the totals

Costs count the dense pre-training too, also when it is reused (--pretrained, or compare's dense cell): the point
of comparing with pruning at initialisation is the whole cost of getting a sparse robust network.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import dataclass, field

import torch
import yaml

from ..api import eval_stage, load
from ..config import RunConfig, config_from_dict
from ..data import load_split
from ..errors import UserError
from ..eval import parse_suite
from ..runs.atomic import holds_nothing_but, write_json_atomic, write_yaml_atomic
from ..runs.checkpoint import find_checkpoint, load_checkpoint, read_meta
from ..runs.costs import total_cost
from ..sparse import apply_mask, load_model_state
from ..sparse.ticket import has_ticket, load_ticket, ticket_mask, write_ticket
from ..train.spec import build_from_spec, model_spec
from ..train.stages import is_finished, recorded_seconds, run_epochs, train_stage
from ..utils.device import resolve_device
from .after import AFTER_TRAINING, Outcome

REQUEST = "posttrain.yaml"


@dataclass
class PosttrainResult:
    out: str
    method: str
    outcomes: list[Outcome]
    evals: dict = field(default_factory=dict)  # density -> eval.json contents (absent with suite "none")


class Pipeline:
    """What a method gets: the config, the pre-trained run, and resumable building blocks."""

    def __init__(self, cfg: RunConfig, out: str, densities: list[float], pretrained: str, reused: bool,
                 progress: bool = True):
        self.cfg, self.out, self.densities, self.progress = cfg, out, densities, progress
        self.pretrained, self.reused = pretrained, reused
        self.spec = model_spec(cfg)
        self.device = resolve_device(cfg.train.device)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def say(self, msg: str) -> None:
        if self.progress:
            print(f"[posttrain] {msg}", file=sys.stderr, flush=True)

    def load_run(self, run_dir: str) -> torch.nn.Module:
        return load(run_dir, which="best", device=self.device)

    def pretrained_model(self) -> torch.nn.Module:
        """The pre-trained dense network (its best checkpoint: the one its evaluation reports)."""
        return self.load_run(self.pretrained)

    def pretrain_cost(self) -> dict:
        label = "dense pre-training" + (" (reused)" if self.reused else "")
        return {"stage": label, "epochs": run_epochs(self.pretrained), "seconds": recorded_seconds(self.pretrained)}

    def rewind_state(self) -> dict:
        """IMP's rewinding point: θ₀ of the pre-trained run (rebuilt from its seed) or its epoch-k weights."""
        k = self.cfg.prune.imp_rewind_epoch
        if k == 0:
            with open(os.path.join(self.pretrained, "config.yaml")) as fh:
                seed = yaml.safe_load(fh)["train"]["seed"]
            torch.manual_seed(seed)  # exactly as `train` builds θ₀
            return build_from_spec(self.spec).state_dict()
        tensors, _ = load_checkpoint(os.path.join(self.pretrained, "checkpoints", f"epoch-{k}.json"))
        return {key[len("model."):]: v for key, v in tensors.items() if key.startswith("model.")}

    # tickets ---------------------------------------------------------------------------------------------
    def has_ticket(self, folder: str) -> bool:
        return has_ticket(folder)

    def write_ticket(self, folder: str, state: dict, mask, info: dict) -> None:
        """A ticket folder (what ``train.ticket`` consumes): ``state`` with ``mask`` applied. ticket.json is
        written last, so a kill leaves either no ticket or a whole one."""
        model = build_from_spec(self.spec)
        load_model_state(model, {k: v.cpu() for k, v in state.items()})
        apply_mask(model, mask.to("cpu"))
        info = {"density_target": self.cfg.prune.density, **info, "density": mask.density(), "kept": mask.kept()}
        write_ticket(folder, model, self.spec, self.cfg, info, f"{info['method']} at density {mask.density():.4f}")

    def ticket_mask(self, folder: str):
        return ticket_mask(load_ticket(folder)[0])

    # training stages -------------------------------------------------------------------------------------
    def train(self, ticket_dir: str, run_dir: str, epochs: int, lr: float | None = None, stage: str = "train") -> dict:
        """Train from a ticket with the mask fixed (resumable); return the stage's cost entry."""
        cfg = copy.deepcopy(self.cfg)
        cfg.train.ticket = os.path.abspath(ticket_dir)
        cfg.train.epochs = epochs
        cfg.train.lr = cfg.train.lr if lr is None else lr
        cfg.train.keep_epochs = []
        cfg.train.warmup_epochs = min(cfg.train.warmup_epochs, float(epochs))
        cfg = config_from_dict(cfg.to_dict())
        if not is_finished(run_dir):
            self.say(f"{stage}: {epochs} epochs of {cfg.train.method} at lr {cfg.train.lr:g}")
        seconds = train_stage(cfg, run_dir, self.progress)
        return {"stage": stage, "epochs": epochs, "seconds": seconds}

    def finetune(self, ticket_dir: str, run_dir: str) -> tuple[str, dict]:
        p = self.cfg.prune
        return run_dir, self.train(ticket_dir, run_dir, p.finetune_epochs, p.finetune_lr, stage="fine-tune")

    def write_stage_cost(self, name: str, cost: dict) -> None:
        costs = self._stage_costs()
        costs[name] = cost
        write_json_atomic(self.path("stages.json"), costs, sort_keys=False)

    def read_stage_cost(self, name: str) -> dict:
        return self._stage_costs()[name]

    def _stage_costs(self) -> dict:
        path = self.path("stages.json")
        if not os.path.exists(path):
            return {}
        with open(path) as fh:
            return json.load(fh)


def _check_pretrained(path: str, cfg: RunConfig) -> dict:
    """Refuse a pre-trained run that cannot serve ``cfg``; return its identity (path and best weights' hash)."""
    if not os.path.isdir(path):
        raise UserError(f"--pretrained {path} is not a run folder")
    meta = read_meta(find_checkpoint(path, prefer="best"))
    if not is_finished(path):
        raise UserError(f"--pretrained {path} has not finished training; finish it first "
                        f"(robustsparse train --resume --out {path})")
    if meta.get("model_spec") != model_spec(cfg):
        raise UserError(f"--pretrained {path} is a {meta.get('model_spec')} network, but this config builds "
                        f"{model_spec(cfg)}; use the same data and model settings")
    saved = meta.get("config", {}).get("data", {})
    if saved.get("name") != cfg.data.name or saved.get("options", {}) != cfg.data.options:
        raise UserError(f"--pretrained {path} was trained on {saved.get('name')!r}, not {cfg.data.name!r}")
    k = cfg.prune.imp_rewind_epoch
    if cfg.prune.method == "imp" and k and not os.path.exists(os.path.join(path, "checkpoints", f"epoch-{k}.json")):
        raise UserError(f"prune.imp_rewind_epoch={k} needs the dense run's checkpoint of epoch {k}, and "
                        f"{path} has none (train it with train.keep_epochs=[{k}]); or rewind to initialisation "
                        "with prune.imp_rewind_epoch=0")
    return {"path": os.path.abspath(path), "sha256": meta["sha256"]}


def _densities(method: str, density) -> list[float]:
    values = density if isinstance(density, (list, tuple)) else [density]
    if not values or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < 1 for d in values):
        raise UserError(f"--density must be in (0, 1) (the kept fraction of conv/linear weights), got {density!r}")
    if method != "imp" and len(values) != 1:
        raise UserError(f"{method} prunes to one density per run; got {len(values)}")
    return sorted({float(d) for d in values}, reverse=True)


def _request(cfg, method, densities, suite, pretrained_id) -> dict:
    return {"method": method, "densities": densities, "suite": suite, "pretrained": pretrained_id,
            "config": cfg.to_dict()}


def _same_request(saved: dict, new: dict) -> bool:
    resolved = dict(saved, config=config_from_dict(saved["config"]).to_dict())  # fields added since take defaults
    strip = lambda r: {**r, "pretrained": r["pretrained"] and r["pretrained"]["sha256"]}  # noqa: E731
    return strip(resolved) == strip(new)


def posttrain(cfg: RunConfig | None, out: str, method: str | None = None, density=None, pretrained: str | None = None,
              suite: str | None = None, resume: bool = False, progress: bool = True) -> PosttrainResult:
    """Run (or continue) an after-training pruning pipeline in ``out``.

    ``method``/``density`` default to ``cfg.prune.method``/``cfg.prune.density``; IMP also takes a list of
    densities (one chain landing on each). ``pretrained``: an existing finished dense run to reuse (read only)
    instead of pre-training one in ``out/pretrain``. ``suite``: the final evaluation (default ``cfg.eval.suite``;
    ``"none"`` skips it). ``resume`` with ``cfg=None`` continues the request saved in ``out``.
    """
    request_path = os.path.join(out, REQUEST)
    saved = None
    if os.path.exists(request_path):
        with open(request_path) as fh:
            saved = yaml.safe_load(fh)
    if cfg is None:
        if not resume or saved is None:
            raise UserError(f"--resume: {out} holds no posttrain run ({REQUEST} missing)" if resume
                            else "posttrain needs a config")
        cfg = config_from_dict(saved["config"])
        method, density, suite = saved["method"], saved["densities"], saved["suite"]
        pretrained = saved["pretrained"] and saved["pretrained"]["path"]
    method = method or cfg.prune.method
    if method not in AFTER_TRAINING:
        raise UserError(f"unknown after-training method {method!r}; known: {', '.join(sorted(AFTER_TRAINING))}")
    densities = _densities(method, cfg.prune.density if density is None else density)
    cfg = copy.deepcopy(cfg)
    cfg.prune.method, cfg.prune.density = method, densities[-1]
    cfg = config_from_dict(cfg.to_dict())
    suite = suite or cfg.eval.suite
    if suite != "none":
        parse_suite(suite)
    k = cfg.prune.imp_rewind_epoch
    if method == "imp" and pretrained is None and k >= cfg.train.epochs:
        raise UserError(f"prune.imp_rewind_epoch={k} must be below train.epochs={cfg.train.epochs} (the dense run "
                        "it rewinds into)")
    pretrained_id = _check_pretrained(pretrained, cfg) if pretrained is not None else None
    request = _request(cfg, method, densities, suite, pretrained_id)
    if saved is not None:
        if not _same_request(saved, request):
            raise UserError(f"{out} holds a posttrain run with another method, density, suite, config or "
                            "pre-trained run; continue it with `robustsparse posttrain --resume --out DIR` or pick "
                            "another --out")
    elif resume:
        raise UserError(f"--resume: {out} holds no posttrain run ({REQUEST} missing)")
    elif not holds_nothing_but(out, REQUEST):
        raise UserError(f"{out} already exists and is not a posttrain run; pick another --out")
    else:
        load_split(cfg, "train")  # a missing dataset is refused before the folder exists
        os.makedirs(out, exist_ok=True)
        write_yaml_atomic(request_path, request)  # read back on every rerun: never half-written

    if pretrained is None:
        pretrained = os.path.join(out, "pretrain")
        pre_cfg = copy.deepcopy(cfg)
        if method == "imp" and cfg.prune.imp_rewind_epoch:
            pre_cfg.train.keep_epochs = sorted(set(cfg.train.keep_epochs) | {cfg.prune.imp_rewind_epoch})
        if progress and not is_finished(pretrained):
            print(f"[posttrain] dense pre-training ({cfg.train.method}, {cfg.train.epochs} epochs)", file=sys.stderr)
        train_stage(pre_cfg, pretrained, progress)
    pipe = Pipeline(cfg, out, densities, pretrained, reused=pretrained_id is not None, progress=progress)
    outcomes = AFTER_TRAINING[method](pipe)
    evals = {}
    if suite != "none":
        for o in outcomes:
            pipe.say(f"evaluating {method} at density {o.density:g}: {suite}")
            evals[o.density] = eval_stage(o.run_dir, suite, progress=progress)
    write_json_atomic(os.path.join(out, "cost.json"), {f"{o.density:g}": {"run": o.run_dir, "stages": o.stages,
                                                                    **total_cost(o.stages)} for o in outcomes})
    return PosttrainResult(out, method, outcomes, evals)

