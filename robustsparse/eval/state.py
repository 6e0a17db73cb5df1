"""Resumable evaluation state (after AutoAttack's ``state.py``), kept in one JSON file written atomically.

What it records:

* ``flags[item]`` (and ``flags["autoattack/<component>"]``): per-point robust flags of every finished attack;
* ``partial[key]``: for the attack in progress, which of its points are done. An attack visits the points it
  attacks (those still robust before it) in a fixed order, in chunks of ``batch_size``; ``done`` is how many of
  them are finished and ``flags`` their results so far. ``tag`` (number of points, number attacked, sum of their
  indices) identifies the point list, so progress recorded for another list is ignored rather than mixed in.

A rerun skips finished attacks, and inside the attack in progress skips the finished points. Each chunk's
randomness is seeded from (seed, attack, chunk start), not drawn from a stream shared across attacks, so a
resumed evaluation gives bit for bit the flags of an uninterrupted one with the same batch size. Partial progress
is saved at most every ``SAVE_EVERY_S`` seconds (environment ``ROBUSTSPARSE_EVAL_SAVE_EVERY_S`` overrides it;
tests use 0), finished attacks always. A state written for a different evaluation (suite, ε, norm, data, seed,
model weights) is refused rather than silently reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field

import torch

from ..errors import UserError
from ..runs.atomic import write_text_atomic

SAVE_EVERY_S = 1.0
SAVE_EVERY_ENV = "ROBUSTSPARSE_EVAL_SAVE_EVERY_S"


def chunk_seed(seed: int, key: str, start: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode()) * 100_003 + start) % (2**63 - 1)


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every tensor in ``model.state_dict()``: names, dtypes, shapes, bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class EvalState:
    signature: dict
    flags: dict[str, list[bool]] = field(default_factory=dict)  # item or "autoattack/<component>" -> robust flags
    seconds: dict[str, float] = field(default_factory=dict)
    partial: dict[str, dict] = field(default_factory=dict)  # attack in progress -> {tag, done, flags}

    @classmethod
    def open(cls, path: str | None, signature: dict) -> "EvalState":
        if path is None or not os.path.exists(path):
            return cls(signature=signature)
        try:
            with open(path) as fh:
                data = json.load(fh)
            state = cls(**data)
            if not isinstance(state.signature, dict) or not isinstance(state.flags, dict) \
                    or not isinstance(state.partial, dict):
                raise TypeError("unexpected structure")
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"evaluation state {path} is unreadable ({exc}); delete it to start over") from exc
        if "model" not in state.signature:  # written before the model's digest was recorded: adopt it
            state.signature = {**state.signature, "model": signature.get("model")}
        if state.signature != signature:
            diff = sorted(k for k in set(signature) | set(state.signature)
                          if signature.get(k) != state.signature.get(k))
            raise UserError(f"evaluation state {path} was written for a different evaluation "
                            f"(differs in: {', '.join(diff)}); delete it or use another --state path")
        return state

    @staticmethod
    def stored_signature(path: str | None) -> dict | None:
        """The signature a state file on disk was written with (None: no file, or one that cannot be read)."""
        if path is None or not os.path.exists(path):
            return None
        try:
            with open(path) as fh:
                signature = json.load(fh).get("signature")
        except (OSError, ValueError, AttributeError):
            return None
        return signature if isinstance(signature, dict) else None

    def save(self, path: str | None, throttle: bool = False) -> None:
        if path is None:
            return
        now = time.monotonic()
        every = float(os.environ.get(SAVE_EVERY_ENV, SAVE_EVERY_S))
        if throttle and now - getattr(self, "_saved_at", float("-inf")) < every:
            return
        write_text_atomic(path, json.dumps(asdict(self)))
        self._saved_at = now

    def run_chunks(self, key: str, robust: torch.Tensor, batch_size: int, attack_chunk, path: str | None,
                   seed: int = 0, progress=None) -> torch.Tensor:
        """Attack the points flagged in ``robust`` chunk by chunk with ``attack_chunk(indices) -> still robust``,
        recording progress under ``key`` and resuming from it; return the updated flags."""
        idx = robust.nonzero().flatten()
        out = robust.clone()
        tag = [len(robust), len(idx), int(idx.sum())]
        done = 0
        part = self.partial.get(key)
        if isinstance(part, dict) and part.get("tag") == tag and len(part.get("flags", ())) == len(robust):
            out = torch.tensor(part["flags"], dtype=torch.bool, device=robust.device)
            done = int(part["done"])
            if progress is not None and done:
                progress(done)
        for start in range(done, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            torch.manual_seed(chunk_seed(seed, key, start))
            out[chunk] = attack_chunk(chunk)
            if progress is not None:
                progress(len(chunk))
            self.partial[key] = {"tag": tag, "done": start + len(chunk), "flags": out.tolist()}
            self.save(path, throttle=True)
        self.partial.pop(key, None)
        return out
