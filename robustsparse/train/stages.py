"""The idempotent, resumable training stage shared by ``compare`` and ``posttrain`` (their evaluation stage is
``api.eval_stage``).

Calling a stage again is always safe: a finished stage returns what it recorded, an interrupted training run
resumes from its last checkpoint (exactly, see the trainer), and an evaluation resumes from its state file.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import yaml

from ..config import RunConfig
from ..runs.atomic import write_json_atomic


def train_stage(cfg: RunConfig, run_dir: str, progress: bool = True) -> float:
    """Train ``cfg`` into ``run_dir`` unless finished; return the wall seconds of the invocation that finished it
    (recorded in ``train_seconds.json``; time spent in an invocation that was killed is not counted)."""
    from . import train
    started = time.perf_counter()
    if os.path.exists(os.path.join(run_dir, "checkpoints", "last.json")):
        if is_finished(run_dir):
            return recorded_seconds(run_dir)
        train(None, run_dir, resume=True, progress=progress)
    else:
        if os.path.isdir(run_dir) and os.listdir(run_dir):  # config written, nothing trained: start over
            shutil.rmtree(run_dir)
        train(cfg, run_dir, progress=progress)
    seconds = time.perf_counter() - started
    write_json_atomic(os.path.join(run_dir, "train_seconds.json"), {"seconds": seconds})  # read back: atomic
    return seconds


def is_finished(run_dir: str) -> bool:
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        return json.load(fh).get("status") == "finished"


def recorded_seconds(run_dir: str) -> float:
    """Training wall seconds of a finished run: ``train_seconds.json``, else the sum of its epochs' times."""
    path = os.path.join(run_dir, "train_seconds.json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)["seconds"]
    from ..runs.logger import read_metrics
    return sum(r["seconds"] for r in read_metrics(run_dir))


def run_epochs(run_dir: str) -> int:
    """The number of epochs a run folder was configured to train."""
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        return int(yaml.safe_load(fh)["train"]["epochs"])
