"""Run-folder bookkeeping: ``metrics.jsonl`` (one JSON line per epoch), TensorBoard events, and ``run.json``."""
from __future__ import annotations

import json
import os
import time

from .atomic import write_json_atomic, write_text_atomic


class MetricsLog:
    """Append-only ``metrics.jsonl`` mirrored to TensorBoard; on resume, lines of epochs to be redone are dropped."""

    def __init__(self, run_dir: str, resume_epoch: int | None = None, purge_step: int | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.rows = read_metrics(run_dir)
        if resume_epoch is not None:
            self.rows = [r for r in self.rows if r["epoch"] < resume_epoch]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)
        except ImportError:  # pragma: no cover - tensorboard is a declared dependency
            pass

    def append(self, row: dict, step: int) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # durable before the epoch's checkpoint is, so a resume never skips a row
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill mid-write: everything after it is redone on resume
                break
    return rows


def write_status(run_dir: str, **fields) -> None:
    path = os.path.join(run_dir, "run.json")
    data = {}
    if os.path.exists(path):
        try:
            with open(path) as fh:
                data = json.load(fh)
        except ValueError:  # damaged by hand (it is written atomically): the fields below rebuild it
            data = {}
        if not isinstance(data, dict):
            data = {}
    data.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json_atomic(path, data)
