"""A ticket folder (the output of ``robustsparse prune``) and the pipeline that writes it.

    <ticket>/config.yaml                       the resolved config (prune section included)
    <ticket>/ticket.json + ticket.<sha>.safetensors   mask buffers and initial weights (a checkpoint, label "ticket")
    <ticket>/mask_report.md                    per-layer density, non-zero parameters and MACs
    <ticket>/prune.json                        method, density, wall time, search log
"""
from __future__ import annotations

import json
import os

import torch
import yaml

from ..config import RunConfig
from ..errors import UserError
from ..runs.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ..sparse import sparsity_report
from .registry import Ticket, find_ticket

LABEL = "ticket"


def prune_to_folder(cfg: RunConfig, out: str, progress: bool = True) -> Ticket:
    """Build θ₀ exactly as ``train`` would (same seed), find the ticket and write the folder ``out``."""
    from ..train.trainer import build_from_spec, load_split, model_spec, resolve_device

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out} already exists and is not empty; pick another --out")
    device = resolve_device(cfg.train.device)
    x, y = (v.to(device) for v in load_split(cfg, "train"))
    spec = model_spec(cfg)
    torch.manual_seed(cfg.train.seed)  # the same θ₀ as a dense `train` run with this seed
    model = build_from_spec(spec).to(device)
    ticket = find_ticket(model, cfg, x, y)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    save_checkpoint(out, LABEL, {f"model.{k}": v for k, v in ticket.state.items()},
                    {"model_spec": spec, "config": cfg.to_dict(), "prune": _jsonable(ticket.info),
                     "epoch": 0, "step": 0, "eval_eps": cfg.attack.eps, "eval_norm": cfg.attack.norm})
    sparse = build_from_spec(spec)
    load_model_state(sparse, ticket.state)
    report = sparsity_report(sparse, (spec["in_channels"], *spec["input_size"]))
    with open(os.path.join(out, "mask_report.md"), "w") as fh:
        fh.write(f"# Ticket: {cfg.prune.method} at density {cfg.prune.density}\n\n{report.table()}\n")
    with open(os.path.join(out, "prune.json"), "w") as fh:
        json.dump(_jsonable(ticket.info), fh, indent=1)
    return ticket


def load_ticket(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state with mask buffers, metadata) of a ticket folder or its ticket.json."""
    handle = find_checkpoint(path, prefer=LABEL)
    tensors, meta = load_checkpoint(handle)
    if meta.get("label") != LABEL:
        raise UserError(f"{path} is not a ticket (a `robustsparse prune` output); found a {meta.get('label')!r} "
                        "checkpoint")
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, meta


def load_model_state(model, state: dict, source: str = "the saved weights") -> None:
    """Load a state dict that may carry ``weight_mask`` buffers: the mask is attached first, then the weights."""
    from ..sparse import attach_mask_buffers
    if any(k.endswith("weight_mask") for k in state):
        attach_mask_buffers(model, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise UserError(f"{source} does not fit this architecture: {detail}") from exc


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=float))
