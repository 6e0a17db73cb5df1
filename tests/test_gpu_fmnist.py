"""scripts/gpu_fmnist.py (issue 17's GPU protocol): the epoch count is fitted to the time budget from a measured
rate, and the whole sequence (bench, three seeds trained side by side, each evaluated) runs on the CPU at tiny
sizes, so the one call a lent GPU gets has run everywhere else first.

The dry run is opt-in (ROBUSTSPARSE_GPU_CHECK_DRY_RUN=1, as tests/test_gpu_check.py): seven fresh processes that
each import torch, about a minute of CPU."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_fmnist  # noqa: E402


def test_epochs_fit_the_budget_and_stay_within_bounds():
    # 20,000 images/s of one loop: an epoch of 55,000 is 2.75 s, ×1.1 validation, ×1.5 for three loops = 4.54 s
    assert gpu_fmnist.fitted_epochs(20_000, budget_s=270) == 59
    epoch_s = 55_000 / 20_000 * gpu_fmnist.VALIDATION_SHARE * gpu_fmnist.PARALLEL_SLOWDOWN
    assert 59 * epoch_s <= 270 < 60 * epoch_s
    assert gpu_fmnist.fitted_epochs(1e9) == gpu_fmnist.MAX_EPOCHS == 100  # never past Croce et al.'s budget
    assert gpu_fmnist.fitted_epochs(10.0) == gpu_fmnist.MIN_EPOCHS  # a slow machine still trains the config's 4


@pytest.mark.skipif(os.environ.get("ROBUSTSPARSE_GPU_CHECK_DRY_RUN") != "1",
                    reason="opt-in: set ROBUSTSPARSE_GPU_CHECK_DRY_RUN=1 (about a minute of CPU)")
def test_dry_run_trains_and_evaluates_every_seed(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_fmnist.py"), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 0 and summary["failed"] == 0, (summary, proc.stderr[-2000:])
    assert [s["step"] for s in summary["steps"]] == ["bench", "train", "eval"] and summary["epochs"] == 1
    assert sorted(summary["results"]) == ["0", "1", "2"]
    for seed in ("0", "1", "2"):
        assert summary["results"][seed]["n"] == 32
        assert json.load(open(tmp_path / f"seed{seed}" / "run.json"))["status"] == "finished"
    per_seed = summary["accuracy"]["clean"]["per_seed"]
    assert len(per_seed) == 3 and summary["accuracy"]["clean"]["mean"] == pytest.approx(sum(per_seed) / 3)
    assert summary["points"] == {"clean": 32, "pgd-2": 32}
