"""Pruning at initialisation: one registry, one file per method.

A pruner maps a dense model at initialisation (θ₀) and training data to a ``Ticket``: a ``Mask`` and the ticket's
initial weights (θ₀ itself for scoring methods; the searched m⊙θ_s for NTT/AWT R1). Adding a method is one file with
a function ``prune(model, cfg, x, y) -> Ticket`` and one ``register_pruner`` line below.
"""
from __future__ import annotations

from .registry import PRUNERS, Ticket, find_ticket, register_pruner  # noqa: F401
from . import oneshot  # noqa: F401,E402  (registers random, magnitude, snip, grasp, synflow)
from . import ntt, awt  # noqa: F401,E402

__all__ = ["PRUNERS", "Ticket", "find_ticket", "register_pruner"]
