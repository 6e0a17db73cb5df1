"""A ticket folder: a sparse network's mask buffers and initial weights, what ``train.ticket`` starts from.

    <ticket>/ticket.json + ticket.<sha12>.safetensors   mask buffers and weights (a checkpoint, label "ticket")
    <ticket>/mask_report.md                              per-layer density, non-zero parameters and MACs
    <ticket>/prune.json                                  how it was found (method, density, wall time, search log)

One writer (``write_ticket``) serves pruning at initialisation (pipelines/ticket.py) and after training
(posttrain/pipeline.py). ``ticket.json`` is written last: it marks the folder complete, so a kill leaves either no
ticket or a whole one.
"""
from __future__ import annotations

import json
import os

import torch

from ..errors import UserError
from ..runs.atomic import write_json_atomic, write_text_atomic
from ..runs.checkpoint import find_checkpoint, load_checkpoint, read_meta, save_checkpoint
from .consistency import check_mask_state
from .mask import Mask
from .report import sparsity_report

LABEL = "ticket"


def has_ticket(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, f"{LABEL}.json"))


def write_ticket(folder: str, model: torch.nn.Module, spec: dict, cfg, info: dict, title: str) -> None:
    """Write ``model`` (mask buffers attached) as the ticket folder ``folder``; ``info`` goes to prune.json and the
    checkpoint's ``prune`` field, ``title`` heads mask_report.md; ``cfg`` is the run config that found it."""
    os.makedirs(folder, exist_ok=True)
    info = _jsonable(info)
    report = sparsity_report(model, (spec["in_channels"], *spec["input_size"]))
    write_text_atomic(os.path.join(folder, "mask_report.md"), f"# Ticket: {title}\n\n{report.table()}\n")
    write_json_atomic(os.path.join(folder, "prune.json"), info, sort_keys=False)
    save_checkpoint(folder, LABEL, {f"model.{k}": v for k, v in model.state_dict().items()},
                    {"model_spec": spec, "config": cfg.to_dict(), "prune": info, "epoch": 0, "step": 0,
                     "eval_eps": cfg.attack.eps, "eval_norm": cfg.attack.norm})


def load_ticket(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state with mask buffers, metadata) of a ticket folder or its ticket.json."""
    handle = find_checkpoint(path, prefer=LABEL)
    tensors, meta = load_checkpoint(handle)
    if meta.get("label") != LABEL:
        raise UserError(f"{path} is not a ticket (a `robustsparse prune` output); found a {meta.get('label')!r} "
                        "checkpoint")
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    prune_info = meta.get("prune")
    check_mask_state(state, prune_info.get("density") if isinstance(prune_info, dict) else None, f"ticket {handle}")
    return state, meta


def ticket_summary(path: str) -> dict:
    """How the ticket at ``path`` was found (method, density, and for NTT/AWT the search preset, its resolved
    settings and cost), which a training run started from it records in run.json (``ticket``)."""
    info = read_meta(find_checkpoint(path, prefer=LABEL)).get("prune") or {}
    keys = ("method", "density", "preset", "settings", "overridden", "seconds", "cost")
    return {"path": path, **{k: info[k] for k in keys if k in info}}


def ticket_mask(state: dict[str, torch.Tensor]) -> Mask:
    """The ``Mask`` (keyed by weight name) that a ticket state's ``weight_mask`` buffers hold."""
    return Mask({k[:-len("_mask")]: v for k, v in state.items() if k.endswith(".weight_mask")})


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=float))
