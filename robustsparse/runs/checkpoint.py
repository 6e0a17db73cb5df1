"""Checkpoints: tensors in safetensors, everything else in JSON, never pickle.

A checkpoint is a pair: ``<label>.json`` (the handle: metadata, library version, the weights file's name and its
SHA-256) and ``<label>.<hash12>.safetensors`` (model, optimizer and RNG tensors). Writing is crash-safe: the
weights go to a new, content-named file (temp file, fsync, rename), then the JSON handle is replaced atomically,
then the old weights file is removed. A kill at any point leaves the previous handle pointing at intact weights.
Loading verifies the hash, so a truncated or altered weights file is refused with a clear message.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError

FORMAT = "robustsparse-checkpoint/1"


def _version() -> str:
    from .. import __version__
    return __version__


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_replace(tmp: str, final: str) -> None:
    os.replace(tmp, final)
    dir_fd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_replace(tmp, path)


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
    _fsync_replace(tmp, os.path.join(folder, weights))
    write_json_atomic(handle, {**meta, "format": FORMAT, "label": label, "library_version": _version(),
                               "weights": weights, "sha256": digest})
    if old_weights and old_weights != weights and os.path.exists(os.path.join(folder, old_weights)):
        os.remove(os.path.join(folder, old_weights))
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
    except (SafetensorError, OSError) as exc:  # pragma: no cover - the hash check catches truncation first
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
