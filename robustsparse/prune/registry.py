"""The pruner registry and the ``Ticket`` it returns."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import RunConfig
from ..errors import UserError
from ..sparse import Mask

PRUNERS: dict[str, Callable] = {}
DEFAULT_SCOPE = {"ntt": "layer", "awt": "layer"}  # NTT prunes layer-wise (method-notes §4(f).5); scores: global


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
    return cfg.prune.scope or DEFAULT_SCOPE.get(cfg.prune.method, "global")


def find_ticket(model: nn.Module, cfg: RunConfig, x: torch.Tensor, y: torch.Tensor) -> Ticket:
    """Run ``cfg.prune.method`` on ``model`` (dense, at initialisation; not modified) with training data (x, y)."""
    if cfg.prune.method not in PRUNERS:
        raise UserError(f"unknown pruning method {cfg.prune.method!r}; known: {', '.join(sorted(PRUNERS))}")
    started = time.perf_counter()
    ticket = PRUNERS[cfg.prune.method](model, cfg, x, y)
    ticket.info.update(method=cfg.prune.method, density_target=cfg.prune.density, scope=scope_of(cfg),
                       density=ticket.mask.density(), seconds=time.perf_counter() - started)
    return ticket
