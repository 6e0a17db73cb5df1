"""A ticket folder (the output of ``robustsparse prune``) and the pipeline that writes it.

    <ticket>/config.yaml                       the resolved config (prune section included)
    <ticket>/ticket.json + ticket.<sha>.safetensors   mask buffers and initial weights (a checkpoint, label "ticket")
    <ticket>/mask_report.md                    per-layer density, non-zero parameters and MACs
    <ticket>/prune.json                        method, density, wall time, search log
    <ticket>/search-state/                     ntt/awt only, while the search runs: its resumable state

``prune_to_folder(..., resume=True)`` (CLI ``prune --resume``) continues a killed search from its state.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import yaml

from ..config import RunConfig
from ..errors import UserError
from ..runs.atomic import holds_nothing_but, write_json_atomic, write_text_atomic, write_yaml_atomic
from ..runs.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ..sparse import sparsity_report
from ..prune.registry import Ticket, find_ticket

LABEL = "ticket"


def prune_to_folder(cfg: RunConfig | None, out: str, progress: bool = True, resume: bool = False) -> Ticket:
    """Build θ₀ exactly as ``train`` would (same seed), find the ticket and write the folder ``out``.
    ``resume``: continue the prune run in ``out`` (its config.yaml; ``cfg``, if given, must be the same)."""
    from ..train.trainer import build_from_spec, load_split, model_spec, resolve_device

    cfg_path = os.path.join(out, "config.yaml")
    if resume:
        cfg = _resume_config(out, cfg_path, cfg)
        if os.path.exists(os.path.join(out, f"{LABEL}.json")):
            state, meta = load_ticket(out)
            shutil.rmtree(os.path.join(out, "search-state"), ignore_errors=True)  # a kill may have left it
            from ..sparse import Mask
            mask = Mask({k[:-len(".weight_mask")] + ".weight": v for k, v in state.items()
                         if k.endswith(".weight_mask")})
            return Ticket(mask=mask, state=state, info=meta["prune"])
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
    report = sparsity_report(sparse, (spec["in_channels"], *spec["input_size"]))
    # ticket.json last: it marks the folder complete (resume returns it as is), so everything else comes first
    write_text_atomic(os.path.join(out, "mask_report.md"),
                      f"# Ticket: {cfg.prune.method} at density {cfg.prune.density}\n\n{report.table()}\n")
    write_json_atomic(os.path.join(out, "prune.json"), _jsonable(ticket.info), sort_keys=False)
    save_checkpoint(out, LABEL, {f"model.{k}": v for k, v in ticket.state.items()},
                    {"model_spec": spec, "config": cfg.to_dict(), "prune": _jsonable(ticket.info),
                     "epoch": 0, "step": 0, "eval_eps": cfg.attack.eps, "eval_norm": cfg.attack.norm})
    shutil.rmtree(state_dir, ignore_errors=True)
    return ticket


def _resume_config(out: str, cfg_path: str, cfg: RunConfig | None) -> RunConfig:
    from ..config import config_from_dict
    if not os.path.exists(cfg_path):
        raise UserError(f"{out} holds no prune run to resume (no config.yaml); run without --resume")
    with open(cfg_path) as fh:
        saved = config_from_dict(yaml.safe_load(fh))
    if cfg is not None and cfg.to_dict() != saved.to_dict():
        raise UserError(f"{out} was started with another config; resume it without a config or use another --out")
    return saved


def load_ticket(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state with mask buffers, metadata) of a ticket folder or its ticket.json."""
    handle = find_checkpoint(path, prefer=LABEL)
    tensors, meta = load_checkpoint(handle)
    if meta.get("label") != LABEL:
        raise UserError(f"{path} is not a ticket (a `robustsparse prune` output); found a {meta.get('label')!r} "
                        "checkpoint")
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    from ..sparse.consistency import check_mask_state
    prune_info = meta.get("prune")
    check_mask_state(state, prune_info.get("density") if isinstance(prune_info, dict) else None, f"ticket {handle}")
    return state, meta


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
