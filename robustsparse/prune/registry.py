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

PRUNERS: dict[str, Callable] = {}
# NTT prunes layer-wise (method-notes §4(f).5); AWT and the scorers prune globally, and AWT's search starts from the
# SynFlow mask and keeps its per-layer budget (prune.allocation=fixed). Measured on digits with the same code
# (docs/results/digits.md): AWT 84.72% vs 75.56% (layer-wise) under AutoAttack at density 0.05, 86.67% vs 85.56% at 0.1.
DEFAULT_SCOPE = {"ntt": "layer"}
DEFAULT_INIT = {"ntt": "magnitude", "awt": "synflow"}


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


def init_method_of(cfg: RunConfig) -> str:
    return cfg.prune.init_method or DEFAULT_INIT.get(cfg.prune.method, "magnitude")


def find_ticket(model: nn.Module, cfg: RunConfig, x: torch.Tensor, y: torch.Tensor,
                state_dir: str | None = None, progress: bool = True) -> Ticket:
    """Run ``cfg.prune.method`` on ``model`` (dense, at initialisation; not modified) with training data (x, y).
    ``state_dir``: where a resumable pruner (one whose function takes ``state_dir``: ntt, awt) keeps its state."""
    if cfg.prune.method not in PRUNERS:
        after = " (it prunes a trained network: use `robustsparse posttrain`)" \
            if cfg.prune.method in ("hydra", "lwm", "imp") else ""
        raise UserError(f"{cfg.prune.method!r} is not a pruning-at-initialisation method{after}; known: "
                        f"{', '.join(sorted(PRUNERS))}")
    import torch._dynamo  # noqa: F401  (the first optimizer built in a process imports it: seconds of one-time
    #                                   library loading that a search would otherwise be billed for)
    started = time.perf_counter()
    fn = PRUNERS[cfg.prune.method]
    resumable = "state_dir" in inspect.signature(fn).parameters
    ticket = fn(model, cfg, x, y, state_dir=state_dir, progress=progress) if resumable else fn(model, cfg, x, y)
    ticket.info.update(method=cfg.prune.method, density_target=cfg.prune.density, scope=scope_of(cfg),
                       density=ticket.mask.density(), seconds=time.perf_counter() - started)
    if "search_seconds" in ticket.info:  # a resumed search: its own clock includes the runs before the kill
        ticket.info["seconds"] = ticket.info["search_seconds"]
    return ticket
