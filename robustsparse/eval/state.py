"""Resumable evaluation state (after AutoAttack's ``state.py``): which suite items and AutoAttack components are
done, with their per-sample robust flags, written atomically to JSON after each one. A state written for a
different suite, ε, norm, data or seed is refused rather than silently mixed in.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..errors import UserError


@dataclass
class EvalState:
    signature: dict
    flags: dict[str, list[bool]] = field(default_factory=dict)  # item or "autoattack/<component>" -> robust flags
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | None, signature: dict) -> "EvalState":
        if path is None or not os.path.exists(path):
            return cls(signature=signature)
        try:
            with open(path) as fh:
                data = json.load(fh)
            state = cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"evaluation state {path} is unreadable ({exc}); delete it to start over") from exc
        if state.signature != signature:
            diff = sorted(k for k in set(signature) | set(state.signature)
                          if signature.get(k) != state.signature.get(k))
            raise UserError(f"evaluation state {path} was written for a different evaluation "
                            f"(differs in: {', '.join(diff)}); delete it or use another --state path")
        return state

    def save(self, path: str | None) -> None:
        if path is None:
            return
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(asdict(self), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
