"""Training: exact resume after SIGKILL, run-folder contents, big models on CIFAR-shaped data, objectives, schedules."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import robustsparse as rs
from robustsparse.config import load_config
from robustsparse.runs.checkpoint import find_checkpoint, load_checkpoint
from robustsparse.train import train
from robustsparse.train.objectives import build_objective
from robustsparse.train.schedule import lr_at

TINY = ["train.epochs=2", "model.options={width: 8}", "attack.steps=2", "train.val_attack_steps=2",
        "train.batch_size=128", "train.checkpoint_every_steps=2"]


def _cli(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "robustsparse", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _final_tensors(run):
    tensors, meta = load_checkpoint(find_checkpoint(run, prefer="last"))
    return tensors, meta


@pytest.mark.parametrize("kill_at", [5, 13])  # mid-epoch 1 (after a step checkpoint) and mid-epoch 2
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, kill_at):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert _cli(["train", "digits_pgdat", *TINY, "--out", ref, "--no-progress"]).returncode == 0
    dead = _cli(["train", "digits_pgdat", *TINY, "--out", killed, "--no-progress"],
                {"ROBUSTSPARSE_KILL_AT_STEP": str(kill_at)})
    assert dead.returncode == -9, dead.stderr  # really killed by SIGKILL, not a clean exit
    resumed = _cli(["train", "--resume", "--out", killed, "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    (a, meta_a), (b, meta_b) = _final_tensors(ref), _final_tensors(killed)
    assert a.keys() == b.keys()
    for key in a:  # model weights, BN statistics and momentum buffers, bit for bit
        assert torch.equal(a[key], b[key]), key
    assert meta_a["best"] == meta_b["best"]
    rows = [[{k: v for k, v in r.items() if k != "seconds"} for r in rs.runs.logger.read_metrics(run)]
            for run in (ref, killed)]
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_run_folder_has_everything(tmp_path):
    out = str(tmp_path / "run")
    cfg = load_config("digits_pgdat", TINY[:-1] + ["train.epochs=3", "train.val_every=2"])
    result = train(cfg, out, progress=False)
    files = set(os.listdir(out))
    assert {"config.yaml", "metrics.jsonl", "curves.png", "run.json", "checkpoints", "tensorboard"} <= files
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))
    rows = rs.runs.logger.read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert "val_robust_acc" in rows[1] and "val_robust_acc" in rows[2] and "val_robust_acc" not in rows[0]
    assert "PGD-2" in rows[1]["val_attack"]
    best = json.load(open(os.path.join(out, "checkpoints", "best.json")))
    last = json.load(open(os.path.join(out, "checkpoints", "last.json")))
    assert best["label"] == "best" and last["label"] == "last" and last["epoch"] == 3
    assert best["best"]["score"] == max(r["val_robust_acc"] for r in rows if "val_robust_acc" in r)
    assert result.best_val_robust == best["best"]["score"]
    assert json.load(open(os.path.join(out, "run.json")))["status"] == "finished"
    model = rs.load(out)
    assert not model.training
    x, _ = rs.load_dataset("digits", split="test")
    assert model(x[:4]).shape == (4, 10)


def test_standard_training_learns(tmp_path):
    cfg = load_config("digits_pgdat", ["train.method=standard", "train.epochs=3", "model.options={width: 16}",
                                       "train.val_attack_steps=1"])
    train(cfg, str(tmp_path / "std"), progress=False)
    rows = rs.runs.logger.read_metrics(str(tmp_path / "std"))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_clean_acc"] > 0.8


@pytest.mark.parametrize("arch", ["resnet18", "wrn-16-8"])
def test_big_models_take_a_pgd_at_step_and_an_evaluation_on_cifar_shaped_data(arch):
    torch.manual_seed(0)
    cfg = load_config(None, ["data.name=synthetic", f"model.name={arch}", "attack.steps=2",
                             f"attack.eps={8 / 255}"])
    x, y = rs.load_dataset("synthetic", split="train")
    x, y = x[:8], y[:8]
    assert x.shape[1:] == (3, 32, 32)
    model = rs.build_model(arch, 3, 10, (32, 32))
    objective = build_objective(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    out = objective(x, y)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    assert math.isfinite(out.loss.item())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    res = rs.evaluate(model.eval(), x, y, suite="clean,pgd-2", eps=8 / 255, progress=False)
    assert 0 <= res.accuracy["pgd-2"] <= res.accuracy["clean"] <= 1


def test_trades_loss_matches_reference_formula(robust_digits_model, digits_test):
    model = robust_digits_model
    x, y = digits_test[0][:32], digits_test[1][:32]
    cfg = load_config(None, ["train.method=trades", "train.trades_beta=6", "attack.eps=0.1", "attack.steps=3"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    model.train()
    out = build_objective(model, cfg)(x, y)
    model.load_state_dict(state)  # the objective's train-mode passes moved the BN running statistics
    torch.manual_seed(1)
    x_adv = rs.TradesKL(model, 0.1, steps=3, alpha=cfg.train_alpha)(x, y)
    model.train()
    logits, logits_adv = model(x), model(x_adv)
    kl_sum = (F.softmax(logits, 1) * (F.log_softmax(logits, 1) - F.log_softmax(logits_adv, 1))).sum()
    expected = F.cross_entropy(logits, y) + 6 * kl_sum / len(y)  # TRADES: (1/B)·KL(sum)
    model.load_state_dict(state)
    model.eval()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_schedules():
    assert lr_at(0, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_at(50, 100, 0.1, "cosine") == pytest.approx(0.05)
    assert lr_at(100, 100, 0.1, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_at(40, 100, 0.1, "onecycle") == pytest.approx(0.1)
    assert lr_at(0, 100, 0.1, "onecycle") == 0 and lr_at(100, 100, 0.1, "onecycle") == 0
    assert lr_at(60, 100, 0.1, "multistep", milestones=[0.5, 0.75]) == pytest.approx(0.01)
    assert lr_at(2, 100, 0.1, "cosine", warmup_steps=5) == pytest.approx(0.06)
