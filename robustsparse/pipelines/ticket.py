"""``robustsparse prune``: find a ticket at initialisation and write its folder (layout: sparse/ticket.py).

    <ticket>/config.yaml                       the resolved config (prune section included)
    <ticket>/ticket.json, mask_report.md, prune.json   the ticket (sparse/ticket.write_ticket)
    <ticket>/search-state/                     ntt/awt only, while the search runs: its resumable state

``prune_to_folder(..., resume=True)`` (CLI ``prune --resume``) continues a killed search from its state.
"""
from __future__ import annotations

import os
import shutil

import torch
import yaml

from ..config import RunConfig, config_from_dict
from ..data import load_split
from ..errors import UserError
from ..prune.registry import Ticket, find_ticket
from ..runs.atomic import holds_nothing_but, write_yaml_atomic
from ..sparse import load_model_state
from ..sparse.ticket import LABEL, load_ticket, ticket_mask, write_ticket
from ..train.spec import build_from_spec, model_spec
from ..utils.device import resolve_device


def prune_to_folder(cfg: RunConfig | None, out: str, progress: bool = True, resume: bool = False) -> Ticket:
    """Build θ₀ exactly as ``train`` would (same seed), find the ticket and write the folder ``out``.
    ``resume``: continue the prune run in ``out`` (its config.yaml; ``cfg``, if given, must be the same)."""
    cfg_path = os.path.join(out, "config.yaml")
    if resume:
        cfg = _resume_config(out, cfg_path, cfg)
        if os.path.exists(os.path.join(out, f"{LABEL}.json")):
            state, meta = load_ticket(out)
            shutil.rmtree(os.path.join(out, "search-state"), ignore_errors=True)  # a kill may have left it
            return Ticket(mask=ticket_mask(state), state=state, info=meta["prune"])
    elif not holds_nothing_but(out, "config.yaml"):
        raise UserError(f"{out} already exists and is not empty; pick another --out (or --resume a killed prune)")
    device = resolve_device(cfg.train.device)
    x, y = (v.to(device) for v in load_split(cfg, "train"))
    spec = model_spec(cfg)
    torch.manual_seed(cfg.train.seed)  # the same θ₀ as a dense `train` run with this seed
    model = build_from_spec(spec).to(device)
    fresh = not resume
    os.makedirs(out, exist_ok=True)
    if fresh:  # atomically: a kill mid-write must not leave a truncated config for --resume to misread
        write_yaml_atomic(cfg_path, cfg.to_dict())
    state_dir = os.path.join(out, "search-state")
    try:
        ticket = find_ticket(model, cfg, x, y, state_dir=state_dir, progress=progress)
    except UserError:
        if fresh and not os.path.exists(state_dir):  # refused before any work: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    sparse = build_from_spec(spec)
    load_model_state(sparse, ticket.state)
    # ticket.json last: it marks the folder complete (resume returns it as is)
    write_ticket(out, sparse, spec, cfg, ticket.info, f"{cfg.prune.method} at density {cfg.prune.density}")
    shutil.rmtree(state_dir, ignore_errors=True)
    return ticket


def _resume_config(out: str, cfg_path: str, cfg: RunConfig | None) -> RunConfig:
    if not os.path.exists(cfg_path):
        raise UserError(f"{out} holds no prune run to resume (no config.yaml); run without --resume")
    with open(cfg_path) as fh:
        saved = config_from_dict(yaml.safe_load(fh))
    if cfg is not None and cfg.to_dict() != saved.to_dict():
        raise UserError(f"{out} was started with another config; resume it without a config or use another --out")
    return saved
