"""scripts/gpu_check.sh --dry-run: the GPU check's whole sequence (CUDA tests, bench, a complete PGD-AT run, its
evaluation) at tiny sizes on the CPU, so the script a lent GPU runs once has at least run everywhere else.

Opt-in (ROBUSTSPARSE_GPU_CHECK_DRY_RUN=1): it costs about 40 CPU-seconds (four fresh processes, each importing
torch, plus a training run and an evaluation), 3m50s of wall time on the shared 2-core machine, far above the
suite's per-test budget; the steps it chains are each covered by fast tests of their own."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(os.environ.get("ROBUSTSPARSE_GPU_CHECK_DRY_RUN") != "1",
                    reason="opt-in: set ROBUSTSPARSE_GPU_CHECK_DRY_RUN=1 (about 40 CPU-seconds)")
@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu_out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0 and summary["failed"] == 0, (summary, proc.stdout[-3000:], proc.stderr[-2000:])
    assert [s["step"] for s in summary["steps"]] == ["cuda_tests", "bench", "train", "eval"]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["engine"]["amp"] == "bf16" and set(bench["results"]) == {"ours", "skilled", "plain"}
    with open(out / "run" / "run.json") as fh:
        assert json.load(fh)["status"] == "finished"
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 32 and {"clean", "pgd-2"} <= set(result["accuracy"])
    assert json.loads((out / "machine.json").read_text())["device"] == "cpu"


def test_training_needs_no_matplotlib(tmp_path, monkeypatch, capsys):
    """A bare GPU node may lack matplotlib (it reaches no registry): a run trains and writes everything but its
    curves, and says once that plots are skipped."""
    from robustsparse.config import load_config
    from robustsparse.runs import plots
    from robustsparse.train import train

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(plots, "_warned", False)
    cfg = load_config("digits_pgdat", ["train.epochs=1", "model.options={width: 4}", "attack.steps=1",
                                       "train.val_attack_steps=1", "train.batch_size=256", "data.val_size=40"])
    train(cfg, str(tmp_path / "run"), progress=False)
    files = set(os.listdir(tmp_path / "run"))
    assert {"run.json", "metrics.jsonl", "checkpoints"} <= files and "curves.png" not in files
    assert capsys.readouterr().err.count("matplotlib is not installed") == 1


def test_carried_wheels_install_what_is_missing_and_only_what_fits(tmp_path, monkeypatch):
    """scripts/install_carried_wheels.py: a missing module is unpacked from the wheel whose tags fit this Python;
    wheels for another CPython or another platform are never chosen; a present module is left alone."""
    import importlib.util
    import zipfile
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import install_carried_wheels as carry
    finally:
        sys.path.pop(0)
    me = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    other = "cp39" if me != "cp39" else "cp310"
    assert carry.fits(f"x-1-{me}-{me}-manylinux_2_17_x86_64.whl") and carry.fits("x-1-py3-none-any.whl")
    assert carry.fits("x-1-cp38-abi3-manylinux_2_17_x86_64.whl")
    assert not carry.fits(f"x-1-{other}-{other}-manylinux_2_17_x86_64.whl")
    assert not carry.fits(f"x-1-{me}-{me}-manylinux_2_17_aarch64.whl")
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    for tag, text in ((f"{other}-{other}-manylinux_2_17_x86_64", "WRONG"), ("py3-none-any", "RIGHT")):
        with zipfile.ZipFile(wheels / f"rs_fake_mod-1.0-{tag}.whl", "w") as z:
            z.writestr("rs_fake_mod/__init__.py", f"WHICH = {text!r}\n")
    monkeypatch.setattr(carry, "NEEDED", {"rs_fake_mod": "rs_fake_mod", "json": "json"})
    assert importlib.util.find_spec("rs_fake_mod") is None
    assert carry.main(str(wheels), str(site)) == 0
    assert (site / "rs_fake_mod" / "__init__.py").read_text() == "WHICH = 'RIGHT'\n"
    assert not (site / "json").exists()  # present already: not installed
