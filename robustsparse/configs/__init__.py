"""The configs shipped with the library (``robustsparse configs`` lists them; ``train NAME`` runs one).

Every config starts with a comment header: ``# description: <one line>`` (what ``robustsparse configs`` prints),
then its source (paper and reference code), the reference numbers, and the command that runs it.
"""
from __future__ import annotations

import re
from importlib import resources

from robustsparse.errors import UserError

_DESCRIPTION = re.compile(r"^#\s*description:\s*(.+?)\s*$")


def description(text: str) -> str | None:
    """The ``# description:`` line of a config's leading comment block (None when it has none)."""
    for line in text.splitlines():
        if not line.startswith("#"):
            if line.strip():
                break  # the header ends at the first YAML line
            continue
        m = _DESCRIPTION.match(line)
        if m:
            return m.group(1)
    return None


def shipped_descriptions() -> list[tuple[str, str]]:
    """(name, one-line description) of every shipped config, sorted by name."""
    out = []
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            name = entry.name[:-5]
            text = entry.read_text(encoding="utf-8")
            desc = description(text)
            if desc is None:
                raise UserError(f"shipped config {name} has no '# description:' header line")
            out.append((name, desc))
    return out
