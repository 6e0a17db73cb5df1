"""Atomic, verified checkpoints: a damaged newest checkpoint is refused by name, the previous good one is still
there, and ``train --resume`` falls back to the newest intact checkpoint and ends bit for bit where an undamaged
run ends. Also the atomic writers every other file goes through (runs/atomic.py)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

import robustsparse as rs
from robustsparse.cli import main
from robustsparse.errors import UserError
from robustsparse.runs import atomic
from robustsparse.runs.checkpoint import load_checkpoint, read_meta, save_checkpoint
from robustsparse.runs.logger import read_metrics

FAST = ["model.options={width: 8}", "attack.steps=1", "train.val_attack_steps=1", "train.batch_size=128",
        "train.lr=0.1"]


def _bits(tensors: dict) -> dict:
    return {k: v.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes() for k, v in tensors.items()}


def test_damaged_newest_checkpoints_are_refused_and_resume_falls_back_exactly(tmp_path, capsys):
    args = ["digits_pgdat", *FAST, "train.epochs=3", "train.keep_epochs=[1]"]
    ref = str(tmp_path / "ref")
    assert main(["train", *args, "--out", ref, "--no-progress"]) == 0
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    ckpt = os.path.join(run, "checkpoints")
    last_weights = os.path.join(ckpt, read_meta(os.path.join(ckpt, "last.json"))["weights"])
    with open(last_weights, "r+b") as fh:  # the newest: truncated
        fh.truncate(os.path.getsize(last_weights) // 3)
    best = json.load(open(os.path.join(ckpt, "best.json")))
    best["best"]["score"] = 1.0  # the next newest: edited by hand
    json.dump(best, open(os.path.join(ckpt, "best.json"), "w"))
    capsys.readouterr()

    with pytest.raises(UserError, match=os.path.basename(last_weights)):
        rs.load(run, which="last")
    assert main(["eval", run, "--which", "last", "--suite", "clean", "--n", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and os.path.basename(last_weights) in err and "truncated" in err
    assert main(["eval", run, "--which", "best", "--suite", "clean", "--n", "4", "--no-progress"]) == 2
    assert "best.json" in capsys.readouterr().err
    rs.load(os.path.join(ckpt, "epoch-1.json"))  # the previous good checkpoint is still there and loads

    assert main(["train", "--resume", "--out", run, "--no-progress"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("epoch-1.json" in w for w in warnings)
    assert any(os.path.basename(last_weights) in w for w in warnings) and any("best.json" in w for w in warnings)
    for label in ("last", "best", "epoch-1"):  # retrained from epoch 1: every checkpoint as in the undamaged run
        a, ma = load_checkpoint(os.path.join(ref, "checkpoints", f"{label}.json"))
        b, mb = load_checkpoint(os.path.join(ckpt, f"{label}.json"))
        assert _bits(a) == _bits(b), label
        assert (ma["epoch"], ma["step"], ma["best"]) == (mb["epoch"], mb["step"], mb["best"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_metrics(run)) == strip(read_metrics(ref))
    # the same state has the same content hash: the damaged file was replaced in place by an intact one
    left = sorted(f for f in os.listdir(ckpt) if f.startswith("last."))
    assert left == sorted(["last.json", os.path.basename(last_weights)])


class _Killed(Exception):
    pass


def test_a_kill_between_the_final_best_and_last_resumes_to_the_uninterrupted_last(tmp_path, monkeypatch):
    """The epoch's end writes best, then last. A kill between them leaves best one epoch ahead of last (a step
    checkpoint); resume starts from best, and must still leave last as the uninterrupted run's."""
    from robustsparse.train import trainer
    args = ["digits_pgdat", *FAST, "train.epochs=1", "train.checkpoint_every_steps=4"]  # 9 steps: last at 4, 8
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    assert main(["train", *args, "--out", ref, "--no-progress"]) == 0
    save = trainer.Checkpointer.save

    def dies_before_the_final_last(self, label, epoch, step, epoch_sums):
        if label == "last" and (epoch, step) == (1, 0):
            raise _Killed
        save(self, label, epoch, step, epoch_sums)
    monkeypatch.setattr(trainer.Checkpointer, "save", dies_before_the_final_last)
    with pytest.raises(_Killed):
        main(["train", *args, "--out", run, "--no-progress"])
    ckpt = os.path.join(run, "checkpoints")
    assert (read_meta(os.path.join(ckpt, "last.json"))["step"], read_meta(os.path.join(ckpt, "best.json"))["epoch"]) \
        == (8, 1)
    monkeypatch.setattr(trainer.Checkpointer, "save", save)
    assert main(["train", "--resume", "--out", run, "--no-progress"]) == 0
    for label in ("last", "best"):
        a, ma = load_checkpoint(os.path.join(ref, "checkpoints", f"{label}.json"))
        b, mb = load_checkpoint(os.path.join(ckpt, f"{label}.json"))
        assert _bits(a) == _bits(b), label
        assert (ma["epoch"], ma["step"], ma["best"]) == (mb["epoch"], mb["step"], mb["best"]), label
    assert json.load(open(os.path.join(run, "run.json")))["status"] == "finished"


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "eval.json")
    atomic.write_json_atomic(path, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic.write_json_atomic(path, {"v": 2})
    assert json.load(open(path)) == {"v": 1} and os.listdir(tmp_path) == ["eval.json"]


def test_a_checkpoint_write_that_dies_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    from robustsparse.runs import checkpoint as ck
    folder = str(tmp_path)
    handle = save_checkpoint(folder, "last", {"model.w": torch.ones(3)}, {"epoch": 1})

    def dies(tensors, path):
        open(path, "wb").write(b"half a safetensors file")
        raise KeyboardInterrupt  # like a kill half-way through the write
    monkeypatch.setattr(ck, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, "last", {"model.w": torch.zeros(3)}, {"epoch": 2})
    tensors, meta = load_checkpoint(handle)
    assert meta["epoch"] == 1 and torch.equal(tensors["model.w"], torch.ones(3))
    assert meta["library_version"] == rs.__version__ and len(meta["sha256"]) == 64 and len(meta["meta_sha256"]) == 64


# Modules whose files are read back (on resume, by a rerun, by `rs.load`): every write must go through
# runs/atomic.py (temp file, fsync, rename) or the checkpoint writer. Appending to a log whose reader drops a cut
# last line (metrics.jsonl) is the one other accepted way.
READ_BACK = ["runs", "train", "eval", "pipelines", "posttrain", "cli", "analysis/dynamics.py",
             "sparse/mask.py"]


def _raw_writes(path) -> list[str]:
    import ast
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
        if name == "open" and isinstance(mode, ast.Constant) and "w" in str(mode.value):
            found.append(f"{path}:{node.lineno}: open(..., {mode.value!r})")
        elif name in ("savefig", "write_text", "write_bytes", "replace", "rename") and \
                not (name == "replace" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") != "os"):
            found.append(f"{path}:{node.lineno}: {name}()")
    return found


def test_files_that_are_read_back_are_written_atomically(tmp_path):
    import pathlib
    probe = tmp_path / "probe.py"
    probe.write_text("open(p, 'w')\nfig.savefig(p)\nos.replace(a, b)\n"
                     "open(p, 'a')\nopen(p, 'rb+')\ns.replace('a', 'b')\n")
    assert len(_raw_writes(probe)) == 3  # the scan sees what it is meant to see
    root = pathlib.Path(rs.__file__).parent
    missing = [entry for entry in READ_BACK if not (root / entry).exists()]
    assert not missing, f"READ_BACK names paths that do not exist (moved?): {missing}"
    files = [p for entry in READ_BACK for p in ((root / entry).rglob("*.py") if (root / entry).is_dir()
                                                 else [root / entry])]
    assert len(files) > 15
    problems = [w for p in files if p.name != "atomic.py" for w in _raw_writes(p)]
    assert problems == [], "non-atomic writes of files that are read back:\n" + "\n".join(problems)
