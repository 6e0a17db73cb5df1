"""``robustsparse study``: every stage runs on a tiny budget, the report fills its tables and judges every seed
claim from the numbers (met / not met, never a verdict without numbers), a partial study names what is missing,
and a rerun continues instead of redoing anything. The verdict rules are also checked on hand-made numbers."""
import json
import os

import pytest

from robustsparse.attacks import autoattack as aa
from robustsparse.cli import main
from robustsparse.config import load_config
from robustsparse.pipelines import study_report
from robustsparse.pipelines.study import autoattack_targets, run_study

TINY = ["train.epochs=1", "model.options={width: 8}", "attack.steps=1", "train.val_attack_steps=1",
        "train.batch_size=256", "prune.search_iters=2", "prune.search_batch=4", "eval.n=24", "eval.autoattack_n=8",
        "eval.suite=clean,pgd-2,autoattack"]


@pytest.fixture
def cheap_autoattack(monkeypatch):
    for name, steps in {"apgd-ce": 3, "apgd-t": 2, "fab-t": 2, "square": 20}.items():
        monkeypatch.setitem(aa.STANDARD_BUDGET, name, steps)


def _mtimes(root):
    """Weights, tickets and every finished evaluation (summaries such as results.json are rewritten by design)."""
    def kept(d, f):
        return f.endswith(".safetensors") or f in ("eval.json", "autoattack.json") or os.path.basename(d) == "state"
    stamps = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(root)
              for f in files if kept(d, f)}
    assert len(stamps) > 60
    return stamps


def test_study_runs_every_stage_judges_every_claim_and_continues(cheap_autoattack, tmp_path):
    cfg = load_config("digits_pgdat", TINY)
    out = str(tmp_path / "study")
    kwargs = dict(seeds=[0, 1], methods=("magnitude", "awt"), densities=(0.3, 0.2), lams="0,1", progress=False,
                  config_name="digits_pgdat", posttrain_epochs=1)
    text = open(run_study(cfg, out, stages=("atinit",), **kwargs)).read()
    assert "AutoAttack stage: not run yet." in text and "Once-for-all stage: not run yet." in text
    assert "not measured yet" in text and "| hydra | 0.3 | none yet | missing" in text

    text = open(run_study(cfg, out, **kwargs)).read()
    for s in (0, 1):
        for rel in ("dense", "awt-d0.3/run", "magnitude-d0.3/run", "awt-d0.2/run", "magnitude-d0.2/run"):
            result = json.load(open(os.path.join(out, "atinit", f"seed{s}", rel, "autoattack.json")))
            assert result["points"] == {"clean": 24, "pgd-2": 24, "autoattack": 8}, rel
    claims = text.split("## Seed claims")[1].split("##")[0]
    assert claims.count("- ") == 6 and "not measured yet" not in claims
    assert claims.count("**met**") + claims.count("**not met**") == 6
    for needle in ("| dense | 1 |", "| awt | 0.3 |", "| magnitude | 0.2 |", "| hydra | 0.3 | ", "| lwm | 0.3 | ",
                   "### Seed 1", "atinit/density_robustness.png", "ofa/seed0/sweep/tradeoff.png", "smart-awt",
                   "first 8 of 24 points"):
        assert needle in text, needle
    assert "missing" not in text
    stamps = _mtimes(out)
    assert main(["study", "digits_pgdat", *TINY, "--out", out, "--seeds", "0,1", "--methods", "magnitude,awt",
                 "--densities", "0.3,0.2", "--lams", "0,1", "--posttrain-epochs", "1", "--no-progress"]) == 0
    assert _mtimes(out) == stamps  # nothing retrained, re-pruned or re-attacked


def test_a_seed_still_running_is_named_in_the_after_training_table(tmp_path):
    def record(seed, clean, pgd):
        folder = tmp_path / "posttrain" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "hydra-d0.1.json").write_text(json.dumps(
            {"accuracy": {"clean": clean, "pgd-20": pgd}, "cost": {"seconds": 100.0 * (seed + 1)}}))
    record(0, 0.76, 0.64)
    partial = study_report._posttrain_lines(str(tmp_path), [0, 1], 0.1)
    assert "| hydra | 0.1 | 0 (1 missing) | 76.00% ± " in partial[2] and "(64.00%)" in partial[2]
    assert partial[3].startswith("| lwm | 0.1 | none yet | missing")
    record(1, 0.74, 0.60)
    pooled = study_report._posttrain_lines(str(tmp_path), [0, 1], 0.1)[2]
    assert "| hydra | 0.1 | 0, 1 | 75.00% ± 1.41% (76.00%, 74.00%) | 62.00% ± 2.83% (64.00%, 60.00%) | 150 |" == pooled


def test_the_best_baseline_is_chosen_on_seed_mean_pgd_not_on_autoattack():
    rows = [{"method": "dense", "density": 1.0, "accuracy": {"clean": 0.9, "pgd-20": 0.7}},
            {"method": "awt", "density": 0.1, "accuracy": {"clean": 0.8, "pgd-20": 0.69}},
            {"method": "snip", "density": 0.1, "accuracy": {"clean": 0.85, "pgd-20": 0.60}},
            {"method": "synflow", "density": 0.1, "accuracy": {"clean": 0.7, "pgd-20": 0.65}},
            {"method": "random", "density": 0.05, "accuracy": {"clean": 0.7, "pgd-20": 0.5}}]
    assert autoattack_targets(rows, [0.1, 0.05]) == [("dense", 1.0), ("awt", 0.1), ("synflow", 0.1),
                                                     ("random", 0.05)]


def test_claim_verdicts_follow_their_thresholds():
    found = {("dense", 1.0): {"autoattack": [0.70, 0.72]}, ("awt", 0.1): {"autoattack": [0.70, 0.70]}}
    rows = [{"method": "awt", "density": 0.05, "accuracy": {"clean": 0.8, "pgd-20": 0.60},
             "accuracy_std": {"clean": 0.0, "pgd-20": 0.01}},
            {"method": "snip", "density": 0.05, "accuracy": {"clean": 0.8, "pgd-20": 0.61},
             "accuracy_std": {"clean": 0.0, "pgd-20": 0.01}}]
    lines = study_report._atinit_claims(found, rows, [0.1, 0.05])
    assert "**met**" in lines[0] and "gap +1.00%" in lines[0]  # exactly 1 point: within
    found[("dense", 1.0)]["autoattack"] = [0.71, 0.72]
    lines = study_report._atinit_claims(found, rows, [0.1, 0.05])
    assert "**not met**" in lines[0] and "**not met**" in lines[1] and "best other snip" in lines[1]
    lines = study_report._atinit_claims(found, rows, [0.1, 0.05], {0.1: "short", 0.05: "faithful"})
    assert "AWT (`short` preset, a variant" in lines[0] and "AWT (`faithful` preset) at density 0.05" in lines[1]

    def sweep(smart, oat):
        pts = [{"label": "smart", "lam": lam, "accuracy": {"clean": c, "pgd-20": r}} for lam, c, r in smart]
        pts += [{"label": "oat", "lam": lam, "accuracy": {"clean": c, "pgd-20": r}} for lam, c, r in oat]
        pts += [{"label": "standard", "lam": None, "accuracy": {"clean": 0.9}},
                {"label": "float", "lam": 0.0, "accuracy": {"clean": 0.1, "pgd-20": 0.1}}]
        return {"points": pts}
    smart = [(0.0, 0.9, 0.3), (1.0, 0.8, 0.6)]
    lines = study_report._ofa_claims({0: sweep(smart, [(0.0, 0.85, 0.3), (1.0, 0.8, 0.6)])}, [0])
    assert "**met**" in lines[0] and "not measured yet" in lines[1]  # λ=0 clean equal; no AutoAttack yet
    assert "OAT's" in lines[2] and "**met**" in lines[2] and "**met**" in lines[3]
    lines = study_report._ofa_claims({1: sweep(smart, [(0.0, 0.85, 0.3), (1.0, 0.79, 0.61)])}, [0, 1])
    assert "**not met**" in lines[2] and "seed 1 λ=1" in lines[2]  # labelled by the seed, not its position
    assert all("[seeds 1; 0 not run yet]" in line for line in (lines[0], lines[2], lines[3]))
    assert study_report._ofa_claims({}, [0, 1]) == [
        "- SMART claims: the once-for-all stage has not run yet (not measured)."]
