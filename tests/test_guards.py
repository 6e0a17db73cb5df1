"""Training that goes wrong stops well (robustsparse/train/guards.py): divergence stops the run with one message,
exit 2 and the last good checkpoint kept; catastrophic overfitting is detected, reported, and optionally stops it.
Also the fast-AT objective (fgsm_at) that the overfitting detector exists for."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import robustsparse as rs
from robustsparse.cli import main
from robustsparse.config import load_config
from robustsparse.errors import UserError
from robustsparse.runs.checkpoint import load_checkpoint
from robustsparse.runs.logger import read_metrics
from robustsparse.train import guards
from robustsparse.train.objectives import build_objective

FAST = ["model.options={width: 8}", "attack.steps=2", "train.val_attack_steps=2", "train.batch_size=128",
        "train.lr=0.1"]


def _row(epoch, val, train_adv=0.5, **extra):
    return {"epoch": epoch, "val_robust_acc": val, "train_adv_acc": train_adv, "val_attack": "PGD-10", **extra}


# ---------------------------------------------------------------- the detectors, on synthetic sequences


def test_sudden_drop_from_the_best_is_flagged():
    history = [_row(0, 0.30), _row(1, 0.42), _row(2, 0.40)]
    message = guards.overfit(_row(3, 0.05, train_adv=0.6), history, drop=0.2)
    assert message and "epoch 4" in message and "42.0%" in message and "epoch 2" in message and "5.0%" in message
    assert guards.overfit(_row(3, 0.23), history, drop=0.2) is None  # 19 points below the best: not more than 20
    assert guards.overfit(_row(3, 0.22), history, drop=0.2) is None  # exactly 20: not more
    assert guards.overfit(_row(3, 0.22), history, drop=0.1)  # the threshold is the option


def test_collapse_while_the_training_attack_is_beaten_is_flagged():
    # FGSM-AT from the start: val robust never rose, the FGSM accuracy is high
    message = guards.overfit(_row(0, 0.02, train_adv=0.8), [], drop=0.2)
    assert message and "training attack" in message and "80.0%" in message
    assert guards.overfit(_row(0, 0.02, train_adv=0.1), [], drop=0.2) is None  # early training: nothing learned
    assert guards.overfit(_row(0, 0.30, train_adv=0.8), [], drop=0.2) is None  # a normal robust gap


def test_no_flag_without_a_training_attack_or_validation():
    assert guards.overfit({"epoch": 3, "val_robust_acc": 0.0, "val_attack": "x"}, [_row(0, 0.9)], 0.2) is None
    assert guards.overfit({"epoch": 3, "train_adv_acc": 0.9}, [_row(0, 0.9)], 0.2) is None
    steady = [_row(e, 0.3 + 0.05 * e, train_adv=0.35 + 0.05 * e) for e in range(8)]
    assert all(guards.overfit(r, steady[:i], 0.2) is None for i, r in enumerate(steady))


def test_divergence_detector():
    assert guards.divergence([float("nan"), 128.0], 10, 50.0) == "the training loss is nan"
    assert "inf" in guards.divergence([float("inf"), 128.0], 10, 50.0)
    assert "above train.max_loss_factor" in guards.divergence([200.0 * 128, 128.0], 10, 50.0)
    assert guards.divergence([2.0 * 128, 128.0], 10, 50.0) is None
    assert guards.divergence([200.0 * 128, 128.0], 10, 0.0) is None  # factor 0: only NaN/inf stop a run
    assert guards.divergence([0.0, 0.0], 10, 50.0) is None  # nothing seen yet


def test_nonfinite_tensor_names_the_first_bad_one():
    model = rs.build_model("cnn", 1, 10, (8, 8), width=4)
    assert guards.nonfinite_tensor(model) is None
    name = list(model.state_dict())[3]
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = float("inf")
    assert guards.nonfinite_tensor(model) == name


# ---------------------------------------------------------------- divergence, end to end


def test_an_enormous_lr_stops_with_one_message_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "digits_pgdat", *FAST, "train.lr=1e8", "train.schedule=constant", "train.epochs=2",
                 "train.checkpoint_every_steps=1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("robustsparse:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("robustsparse: error: training diverged (epoch 1, step ")
    assert "lower train.lr" in lines[0] and "last.json" in lines[0]
    status = json.load(open(out / "run.json"))
    assert status["status"] == "diverged" and status["diverged_at"]["epoch"] == 0
    bad_step = status["diverged_at"]["step"]
    # the kept 'last' is the step checkpoint before the bad one, and everything in it is finite
    tensors, meta = load_checkpoint(str(out / "checkpoints" / "last.json"))
    assert meta["epoch"] == 0 and 1 <= meta["step"] < bad_step
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert math.isfinite(meta["epoch_sums"]["acc"][0])
    assert read_metrics(str(out)) == []  # the bad epoch was never logged as if it had finished
    # resuming is deterministic: it diverges again at the same step, and still keeps the good state
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 2
    assert json.load(open(out / "run.json"))["diverged_at"]["step"] == bad_step
    assert load_checkpoint(str(out / "checkpoints" / "last.json"))[1]["step"] == meta["step"]


def test_nan_detection_adds_no_host_sync_to_the_step_loop():
    """The step loop must not read tensors on the host: the guard only runs where the trainer syncs anyway."""
    import inspect

    from robustsparse.train import loop as step_loop
    source = inspect.getsource(step_loop.run_steps)
    # the loop body up to the step-checkpoint call (that callback is where the trainer reads the sums, and guards)
    body = source[source.index("for step, global_step"):source.index("if every and on_checkpoint")]
    for part in (body, inspect.getsource(step_loop.StepCounts.add), inspect.getsource(step_loop.seeded_batches)):
        for sync in (".item()", ".tolist()", "float(", "guard."):
            assert sync not in part, f"{sync} in the step loop"


# ---------------------------------------------------------------- catastrophic overfitting, end to end


def _flag_epoch(k):
    real = guards.overfit

    def fake(row, history, drop):  # the detector itself is tested above; this drives the plumbing
        return "catastrophic overfitting suspected (test)" if row["epoch"] == k else real(row, history, drop)
    return fake


def test_overfitting_is_reported_in_metrics_run_json_and_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(guards, "overfit", _flag_epoch(1))
    out = tmp_path / "warn"
    assert main(["train", "digits_pgdat", *FAST, "train.method=fgsm_at", "train.epochs=2", "--out", str(out),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: catastrophic overfitting suspected (test)" in err
    rows = read_metrics(str(out))
    assert "overfit" not in rows[0] and rows[1]["overfit"] == "catastrophic overfitting suspected (test)"
    status = json.load(open(out / "run.json"))
    assert status["status"] == "finished" and status["overfit"]["epoch"] == 1


def test_on_overfit_stop_stops_before_saving_the_epoch(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(guards, "overfit", _flag_epoch(1))
    out = tmp_path / "stop"
    code = main(["train", "digits_pgdat", *FAST, "train.method=fgsm_at", "train.epochs=3", "train.on_overfit=stop",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "robustsparse: error: catastrophic overfitting suspected (test)" in err
    assert "train.on_overfit=stop" in err
    assert json.load(open(out / "run.json"))["status"] == "overfit"
    assert load_checkpoint(str(out / "checkpoints" / "last.json"))[1]["epoch"] == 1  # epoch 2 never became 'last'
    assert len(read_metrics(str(out))) == 2


def test_a_model_at_chance_level_is_flagged_not_stopped(tmp_path, capsys, monkeypatch):
    assert guards.chance_level({"epoch": 0, "val_clean_acc": 0.10}, 10).startswith("the model is at chance level")
    assert guards.chance_level({"epoch": 0, "val_clean_acc": 0.119}, 10)  # within 2 points of a constant guess
    assert guards.chance_level({"epoch": 0, "val_clean_acc": 0.13}, 10) is None
    # a once-for-all model validated at λ = 1 whose accurate end (λ = 0) learns nothing is flagged too
    lam0 = guards.chance_level({"epoch": 2, "val_clean_acc": 0.74, "val_clean_acc_lam0": 0.10}, 10)
    assert lam0.startswith("the accurate end (λ = 0) is at chance level at epoch 3")
    assert guards.chance_level({"epoch": 2, "val_clean_acc": 0.74, "val_clean_acc_lam0": 0.77}, 10) is None
    assert guards.chance_level({"epoch": 0, "val_clean_acc": 0.51}, 2)
    assert guards.chance_level({"epoch": 0, "val_clean_acc": 0.55}, 2) is None
    assert guards.chance_level({"epoch": 0}, 10) is None  # not validated this epoch
    real = guards.chance_level
    monkeypatch.setattr(guards, "chance_level",
                        lambda row, k: real({**row, "val_clean_acc": 0.1}, k) if row["epoch"] == 1 else None)
    out = tmp_path / "chance"
    assert main(["train", "digits_pgdat", *FAST, "train.epochs=2", "--out", str(out), "--no-progress"]) == 0
    assert "warning: the model is at chance level at epoch 2" in capsys.readouterr().err
    rows = read_metrics(str(out))
    assert "chance" not in rows[0] and "chance level" in rows[1]["chance"]
    status = json.load(open(out / "run.json"))
    assert status["status"] == "finished" and status["chance"]["epoch"] == 1


# ---------------------------------------------------------------- fgsm_at


def test_fgsm_at_uses_fgsm_with_random_start_at_1_25_eps(monkeypatch):
    cfg = load_config("digits_pgdat", ["train.method=fgsm_at", "attack.eps=0.1"])
    seen = {}
    real = rs.FGSM.__init__

    def spy(self, model, eps, alpha=None, random_start=False):
        seen.update(eps=eps, alpha=alpha, random_start=random_start)
        real(self, model, eps, alpha=alpha, random_start=random_start)
    monkeypatch.setattr(rs.FGSM, "__init__", spy)
    model = rs.build_model("cnn", 1, 10, (8, 8), width=4)
    step = build_objective(model, cfg)
    assert seen == {"eps": 0.1, "alpha": pytest.approx(0.125), "random_start": True}
    x, y = rs.load_dataset("digits", split="val")
    model.train()
    out = step(x[:16], y[:16])
    assert out.loss.requires_grad and math.isfinite(out.loss.item()) and 0 <= int(out.correct_adv) <= 16
    with pytest.raises(UserError, match="fgsm_at.*Linf"):
        load_config("digits_pgdat", ["train.method=fgsm_at", "attack.norm=L2", "attack.eps=0.5"])
