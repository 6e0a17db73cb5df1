"""Checkpoints: tensors in safetensors, everything else in JSON, never pickle.

A checkpoint is a pair: ``<label>.json`` (the handle: metadata, library version, the weights file's name and its
SHA-256) and ``<label>.<hash12>.safetensors`` (model, optimizer and RNG tensors). Writing is crash-safe: the
weights go to a new, content-named file (temp file, fsync, rename), then the JSON handle is replaced atomically,
then the old weights file is removed. A kill at any point leaves the previous handle pointing at intact weights.
Loading verifies the hash, so a truncated or altered weights file is refused with a clear message. The handle
carries a second hash, ``meta_sha256``, over its own canonical JSON (every other field), so a handle edited by hand
or damaged on disk is refused too. Both are integrity checks against accidents, not signatures: whoever can write
the folder can recompute them. Handles written before ``meta_sha256`` existed are read without that check.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..errors import UserError
from .atomic import replace_durably, write_json_atomic

__all__ = ["save_checkpoint", "load_checkpoint", "read_meta", "find_checkpoint", "write_json_atomic", "FORMAT",
           "optimizer_tensors", "load_optimizer"]

FORMAT = "robustsparse-checkpoint/1"


def _version() -> str:
    return __version__


def optimizer_tensors(optimizer) -> tuple[dict, list]:
    """An optimizer's state as checkpoint tensors ``optim.<param index>.<name>`` plus its JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    return tensors, sd["param_groups"]


def load_optimizer(optimizer, tensors: dict, param_groups: list) -> None:
    """Inverse of ``optimizer_tensors`` (other keys of ``tensors`` are ignored)."""
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _meta_digest(meta: dict) -> str:
    """SHA-256 of the handle's canonical JSON without its own ``meta_sha256`` field."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_checkpoint(folder: str, label: str, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Write ``folder/<label>.json`` + its weights; return the JSON path. ``meta`` must be JSON-serialisable."""
    os.makedirs(folder, exist_ok=True)
    handle = os.path.join(folder, f"{label}.json")
    old_weights = _weights_name(handle) if os.path.exists(handle) else None
    tmp = os.path.join(folder, f".{label}.safetensors.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    digest = _sha256(tmp)
    weights = f"{label}.{digest[:12]}.safetensors"
    replace_durably(tmp, os.path.join(folder, weights))
    record = {**meta, "format": FORMAT, "label": label, "library_version": _version(), "weights": weights,
              "sha256": digest}
    record["meta_sha256"] = _meta_digest(json.loads(json.dumps(record)))  # hash what a reader will parse
    write_json_atomic(handle, record)
    # the previous weights, and any left by a kill between a weights rename and its handle's (never referenced)
    stale = re.compile(rf"^{re.escape(label)}\.[0-9a-f]{{12}}\.safetensors$")
    for name in os.listdir(folder):
        if name != weights and (name == old_weights or stale.match(name)):
            os.remove(os.path.join(folder, name))
    return handle


def _weights_name(handle: str) -> str | None:
    try:
        with open(handle) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    return meta.get("weights") if isinstance(meta, dict) else None


def read_meta(handle: str) -> dict:
    try:
        with open(handle) as fh:
            meta = json.load(fh)
    except FileNotFoundError as exc:
        raise UserError(f"checkpoint {handle} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {handle} is not a readable JSON checkpoint handle ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{handle} is not a robustsparse checkpoint (expected format {FORMAT})")
    for key in ("weights", "sha256"):
        if not isinstance(meta.get(key), str) or "/" in meta[key] or "\\" in meta[key]:
            raise UserError(f"checkpoint {handle} lacks a valid {key!r} entry; it is damaged")
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):
        raise UserError(f"checkpoint handle {handle} was edited or damaged after it was written: its fields do not "
                        "match the hash recorded in it (meta_sha256); refusing to load it")
    return meta


def load_checkpoint(handle: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint; return (tensors on CPU, metadata)."""
    meta = read_meta(handle)
    weights = os.path.join(os.path.dirname(handle), meta["weights"])
    if not os.path.exists(weights):
        raise UserError(f"checkpoint {handle} names weights {meta['weights']} that are missing")
    if _sha256(weights) != meta["sha256"]:
        raise UserError(f"checkpoint weights {weights} do not match the hash recorded in {handle}: "
                        "the file is truncated or was modified; refusing to load it")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # written so, or hashed after damage
        raise UserError(f"checkpoint weights {weights} are not a valid safetensors file ({exc})") from exc
    return tensors, meta


def find_checkpoint(path: str, prefer: str = "best") -> str:
    """Resolve a run folder, a checkpoint folder, a ``.json`` handle or a ``.safetensors`` file to a handle."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist (expected a run folder, a checkpoint .json or a .safetensors file)")
    if os.path.isdir(path):
        for folder in (os.path.join(path, "checkpoints"), path):
            for label in (prefer, "best", "last", "ticket"):
                handle = os.path.join(folder, f"{label}.json")
                if os.path.exists(handle):
                    return handle
        raise UserError(f"{path} holds no checkpoint (expected checkpoints/best.json or checkpoints/last.json)")
    if path.endswith(".safetensors"):
        folder = os.path.dirname(path) or "."
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json") and _weights_name(os.path.join(folder, name)) == os.path.basename(path):
                return os.path.join(folder, name)
        raise UserError(f"no checkpoint handle (.json) beside {path} refers to it")
    if path.endswith(".json"):
        return path
    raise UserError(f"{path} is not a run folder, a checkpoint .json or a .safetensors file")


def newest_intact(folder: str) -> tuple[dict[str, torch.Tensor], dict, str, list[str]] | None:
    """The training checkpoint in ``folder`` with the most progress (epoch, step; ``last`` first on a tie) whose
    handle and weights verify: (tensors, meta, handle, problems), where ``problems`` are the messages of every
    checkpoint refused on the way. None if the folder holds no checkpoint at all; a ``UserError`` naming each
    damaged file if it holds only damaged ones.

    Falling back is exact for the trainer: every checkpoint it writes (``last``, ``best``, ``epoch-<k>``) holds the
    full training state at an epoch or step boundary, and training from there is a pure function of that state.
    """
    if not os.path.isdir(folder):
        return None
    problems, candidates = [], []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json") or name.startswith("."):
            continue
        handle = os.path.join(folder, name)
        try:
            meta = read_meta(handle)
        except UserError as exc:
            problems.append(str(exc))
            continue
        progress = (meta.get("epoch"), meta.get("step"))
        if all(type(v) is int for v in progress) and "optimizer_param_groups" in meta:
            candidates.append((progress, meta.get("label") == "last", handle))
    for _, _, handle in sorted(candidates, reverse=True):
        try:
            tensors, meta = load_checkpoint(handle)
        except UserError as exc:
            problems.append(str(exc))
            continue
        return tensors, meta, handle, problems
    if problems:
        raise UserError(f"no intact checkpoint to resume from in {folder}: " + " | ".join(problems))
    return None
