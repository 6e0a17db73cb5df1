"""Crash-safe file writes: every file the library writes goes to a temporary name, is flushed and fsynced, and is
then renamed over its final name (and the folder is fsynced), so a kill at any instant leaves either the old
file or the new one, never a truncated mix.

The temporary is ``<name>.tmp`` beside the target: one fixed name, so a temporary left by a killed process is
never read and is simply overwritten by the next write of the same file (no garbage piles up across kills). Two
processes writing the same file at once is not supported (nor is it for a run folder as a whole). The one file
that is not written this way is ``metrics.jsonl``, which is appended to and fsynced (a line cut by a kill is
dropped when read, see runs/logger.py).
"""
from __future__ import annotations

import json
import os


def _tmp_name(path: str) -> str:
    return f"{path}.tmp"


def holds_nothing_but(folder: str, first_file: str) -> bool:
    """True if ``folder`` is missing, empty, or holds only the temporary of ``first_file``: what a start killed
    while writing its first file leaves. Such a folder has no work in it, so a new start may use it (and
    overwrites the temporary); a folder holding anything else is someone's run."""
    if not os.path.exists(folder):
        return True
    return os.path.isdir(folder) and set(os.listdir(folder)) <= {_tmp_name(first_file)}


def fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable (the directory entry itself is data too)."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str, final: str) -> None:
    """Rename an already fsynced ``tmp`` over ``final`` and fsync the folder."""
    os.replace(tmp, final)
    fsync_folder(os.path.dirname(final))


def write_bytes_atomic(path: str, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        replace_durably(tmp, path)
    finally:
        if os.path.exists(tmp):  # only after an exception: the rename consumed it otherwise
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, data, indent: int | None = 1, sort_keys: bool = True) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys))


def write_yaml_atomic(path: str, data) -> None:
    import yaml
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def savefig_atomic(fig, path: str, **kwargs) -> None:
    """``fig.savefig`` through a temporary file; the format is taken from ``path``'s extension."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format=fmt, **kwargs)
            fh.flush()
            os.fsync(fh.fileno())
        replace_durably(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
