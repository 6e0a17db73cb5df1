"""The registry of AFTER-training pruning pipelines (HYDRA, LWM, IMP): one file per method, one decorator line.

A method is ``fn(pipe) -> list[Outcome]``: it gets a ``robustsparse.posttrain.Pipeline`` (the config, the
pre-trained dense run, helpers that write tickets and run resumable training stages) and returns, for each
requested density, the run folder of the final sparse model and the stages it cost.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

AFTER_TRAINING: dict[str, Callable] = {}
DEFAULT_SCOPE = {"hydra": "layer", "lwm": "layer", "imp": "global"}  # HYDRA ranks per layer; LTH/IMP globally


@dataclass
class Outcome:
    density: float
    run_dir: str  # the final sparse model's training run (fine-tune, or IMP's last round for this density)
    stages: list[dict] = field(default_factory=list)  # {"stage", "epochs", "seconds"} in order, pre-training first


def register_after_training(name: str):
    def wrap(fn):
        AFTER_TRAINING[name] = fn
        return fn
    return wrap


def after_scope(cfg) -> str:
    return cfg.prune.scope or DEFAULT_SCOPE.get(cfg.prune.method, "global")
