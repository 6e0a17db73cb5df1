"""Objectives give the trainer everything method-specific (validation hooks, the metric that picks ``best``, counts
with their own denominators), so the trainer names no method, and the once-for-all methods, which attack only
part of each batch, log their training attack's accuracy over the attacked points: the catastrophic-overfitting
check then sees it and can fire for them too."""
from __future__ import annotations

import ast
import json
import pathlib

import pytest

from robustsparse.config import load_config
from robustsparse.runs.logger import read_metrics
from robustsparse.train import guards, trainer
from robustsparse.train.objectives import OBJECTIVES, Objective, StepOutput, build_objective

FAST = ["model.options={width: 8}", "attack.steps=2", "train.val_attack_steps=2", "train.batch_size=128",
        "train.lr=0.1", "train.epochs=1"]


def test_the_trainer_names_no_method():
    tree = ast.parse(pathlib.Path(trainer.__file__).read_text(encoding="utf-8"))
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert len(OBJECTIVES) >= 7
    assert strings & set(OBJECTIVES) == set()


def test_every_objective_comes_with_its_validation_hooks():
    import torch
    from robustsparse.train.spec import build_from_spec, model_spec
    for method in ("standard", "pgd_at", "smart"):
        cfg = load_config("digits_pgdat", FAST + [f"train.method={method}"])
        torch.manual_seed(0)
        model = build_from_spec(model_spec(cfg))
        objective = build_objective(model, cfg)
        assert isinstance(objective, Objective)
        validated = objective.validation_model(model)
        if method == "smart":  # the robust end, λ = 1, and the accurate end's clean accuracy beside it
            assert validated is not model and "val_clean_acc_lam0" in objective.extra_validation(
                model, torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
        else:
            assert validated is model and objective.extra_validation(model, None, None) == {}
        assert objective.selects_on == ("val_clean_acc" if method == "standard" else "val_robust_acc")


@pytest.mark.parametrize("method", ["smart", "oat", "float"])
def test_once_for_all_runs_log_train_adv_acc_over_the_attacked_points_and_can_flag_overfitting(method, tmp_path,
                                                                                             monkeypatch):
    seen = []
    real = trainer.build_objective

    def recording(model, cfg):  # the real objective; each step's counts are copied out to check the row against
        objective = real(model, cfg)
        inner = objective.step

        def step(x, y):
            out: StepOutput = inner(x, y)
            seen.append((int(out.correct_clean), out.n_clean or len(y), int(out.correct_adv), out.n_adv, len(y)))
            return out
        objective.step = step
        return objective

    monkeypatch.setattr(trainer, "build_objective", recording)
    # the collapse rule (val robust < ratio × train adversarial accuracy, once that is ≥ a floor), made to fire for
    # any train_adv_acc > 0: it can fire only if the row holds train_adv_acc, which it never did for these methods
    monkeypatch.setattr(guards, "COLLAPSE_MIN_TRAIN_ADV", 0.0)
    monkeypatch.setattr(guards, "COLLAPSE_RATIO", 1e9)
    out = tmp_path / "run"
    trainer.train(load_config("digits_pgdat", FAST + [f"train.method={method}"]), str(out), progress=False)

    row = read_metrics(str(out))[0]
    clean_ok, clean_n, adv_ok, adv_n, batch = (sum(s[i] for s in seen) for i in range(5))
    assert all(s[3] < s[4] for s in seen)  # part of each batch is attacked: the batch is the wrong denominator
    assert row["train_adv_acc"] == adv_ok / adv_n  # sums of integers in float64: exact
    assert row["train_clean_acc"] == clean_ok / clean_n
    assert 0 < row["train_adv_acc"] <= 1 and adv_ok / batch < row["train_adv_acc"]
    assert row["overfit"].startswith("catastrophic overfitting suspected at epoch 1")
    assert json.load(open(out / "run.json"))["overfit"]["epoch"] == 0


def test_dense_methods_keep_their_metrics_row():
    """pgd_at logs train_adv_acc over the whole batch and no clean accuracy, as before the objectives had hooks."""
    from robustsparse.train.loop import StepCounts
    import torch
    counts = StepCounts("cpu")
    counts.add(StepOutput(torch.tensor(2.0), correct_adv=torch.tensor(3)), 4)
    counts.add(StepOutput(torch.tensor(1.0), correct_adv=torch.tensor(1)), 4)
    assert StepCounts.row(counts.as_list()) == {"train_loss": 1.5, "train_adv_acc": 0.5}
    old = StepCounts("cpu", [6.0, 4.0, 0.0, 3.0])  # a checkpoint's 4-slot sums from before the denominators
    assert old.as_list() == [6.0, 4.0, 0.0, 3.0, 0.0, 4.0]
    assert StepCounts.row(old.as_list()) == {"train_loss": 1.5, "train_adv_acc": 0.75}  # no clean accuracy of 0
