"""The pruner registry and the ``Ticket`` it returns."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import RunConfig
from ..errors import UserError
from ..sparse import Mask
from .presets import preset_value

PRUNERS: dict[str, Callable] = {}
# ntt/awt take their scope and starting scorer from prune.preset (presets.py): short NTT prunes layer-wise
# (method-notes §4(f).5) and short AWT globally from the SynFlow mask; faithful both layer-wise from magnitude.
# The scorers prune globally.


@dataclass
class Ticket:
    mask: Mask
    state: dict[str, torch.Tensor]  # the ticket's initial model state_dict (weights already masked)
    info: dict = field(default_factory=dict)  # method, density, seconds, search log


def register_pruner(name: str):
    def wrap(fn):
        PRUNERS[name] = fn
        return fn
    return wrap


def scope_of(cfg: RunConfig) -> str:
    return preset_value(cfg, "scope") or "global"


def init_method_of(cfg: RunConfig) -> str:
    return preset_value(cfg, "init_method") or "magnitude"


def call_pruner(name: str, model, cfg, x, y, **optional) -> Ticket:
    """``PRUNERS[name]`` with those ``optional`` arguments its function takes (a resumable pruner takes
    ``state_dir``, a long one ``progress``)."""
    fn = PRUNERS[name]
    accepted = inspect.signature(fn).parameters
    return fn(model, cfg, x, y, **{k: v for k, v in optional.items() if k in accepted})


def find_ticket(model: nn.Module, cfg: RunConfig, x: torch.Tensor, y: torch.Tensor,
                state_dir: str | None = None, progress: bool = True) -> Ticket:
    """Run ``cfg.prune.method`` on ``model`` (dense, at initialisation; not modified) with training data (x, y).
    ``state_dir``: where a resumable pruner (one whose function takes ``state_dir``: ntt, awt) keeps its state."""
    if cfg.prune.method not in PRUNERS:
        after = " (it prunes a trained network: use `robustsparse posttrain`)" \
            if cfg.prune.method in ("hydra", "lwm", "imp") else ""
        raise UserError(f"{cfg.prune.method!r} is not a pruning-at-initialisation method{after}; known: "
                        f"{', '.join(sorted(PRUNERS))}")
    started = time.perf_counter()
    ticket = call_pruner(cfg.prune.method, model, cfg, x, y, state_dir=state_dir, progress=progress)
    ticket.info.update(method=cfg.prune.method, density_target=cfg.prune.density, scope=scope_of(cfg),
                       density=ticket.mask.density(), seconds=time.perf_counter() - started)
    if "search_seconds" in ticket.info:  # a resumed search: its own clock includes the runs before the kill
        ticket.info["seconds"] = ticket.info["search_seconds"]
    return ticket
