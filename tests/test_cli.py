"""Tests for the command line: every bad input is one line on stderr, exit status 2, and leaves runs untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import robustsparse as rs
from robustsparse.cli import main
from robustsparse.runs.checkpoint import read_meta

TINY = ["train.epochs=1", "model.options={width: 8}", "attack.steps=1", "train.val_attack_steps=1",
        "train.batch_size=256"]


@pytest.fixture(scope="module")
def cli_run_dir(tmp_path_factory):
    """One tiny trained digits run (a few seconds on a CPU); tests must not modify it (copy it first)."""
    from robustsparse.config import load_config
    from robustsparse.train import train

    run_dir = tmp_path_factory.mktemp("cli_run") / "run"
    train(load_config("digits_pgdat", TINY), str(run_dir), progress=False)
    return str(run_dir)


@pytest.fixture
def run_copy(cli_run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(cli_run_dir, dst)
    return str(dst)


def tree_digest(folder) -> dict[str, str]:
    """{relative path: sha256 of content} for every file under ``folder`` (empty dict if it does not exist)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, out, err, *words):
    assert "Traceback" not in err and "Traceback" not in out
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("robustsparse: error: "), err
    for w in words:
        assert w in lines[0], (w, err)
    return lines[0]


def fail_train(capsys, tmp_path, *argv, out=None):
    """Run a `train` that must fail; check the error and that no folder appeared at --out."""
    out = str(out or tmp_path / "newrun")
    existed = os.path.exists(out)
    before = tree_digest(out)
    code, stdout, stderr = run_cli(capsys, "train", *argv, "--out", out)
    assert os.path.exists(out) == existed, "a failed train must not create its --out folder"
    assert tree_digest(out) == before, "a failed train must not change an existing run"
    return code, stdout, stderr


# ---------------------------------------------------------------- bad inputs: train


def test_unknown_model(capsys, tmp_path):
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", "model.name=resnet99"),
                      "resnet99", "unknown model")


def test_unknown_dataset(capsys, tmp_path):
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", "data.name=imagenet77"),
                      "imagenet77", "unknown dataset")


def test_malformed_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n  lr: 0.1\n")
    assert_user_error(*fail_train(capsys, tmp_path, bad), "bad.yaml", "not valid YAML", "line 3")


def test_yaml_not_a_mapping(capsys, tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    assert_user_error(*fail_train(capsys, tmp_path, bad), "list.yaml", "mapping")


def test_wrong_typed_override(capsys, tmp_path):
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", "train.epochs=abc"), "train.epochs", "int")


def test_unknown_override_key(capsys, tmp_path):
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", "train.epoch=3"), "train.epochs")


def test_override_without_equals(capsys, tmp_path):
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", "train.epochs"), "train.epochs")


def test_missing_data_folder(capsys, tmp_path):
    missing = tmp_path / "missing"
    line = assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", "data.name=cifar10",
                                         f"data.root={missing}"), str(missing))
    assert "CIFAR-10" in line or "cifar" in line.lower()
    assert not missing.exists()


def test_unknown_dataset_option(capsys, tmp_path):
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", "data.options={bogus: 1}"),
                      "bogus", "digits")


def test_unknown_model_option(capsys, tmp_path):
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", "model.options={depth: 3}"), "depth")


def test_config_file_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_user_error(*fail_train(capsys, tmp_path, missing), "nope.yaml", "digits_pgdat")


def test_train_without_config_or_resume(capsys, tmp_path):
    assert_user_error(*fail_train(capsys, tmp_path), "CONFIG")


def test_train_into_existing_run(capsys, tmp_path, run_copy):
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", *TINY, out=run_copy), "--resume", run_copy)


def test_train_into_a_file(capsys, tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", *TINY, out=target), "file")
    assert target.read_text() == "x"


def test_resume_nonexistent_folder(capsys, tmp_path):
    assert_user_error(*fail_train(capsys, tmp_path, "--resume", out=tmp_path / "nothere"),
                      "--resume", "config.yaml")


def test_resume_empty_folder(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(*fail_train(capsys, tmp_path, "--resume", out=empty), "--resume", "config.yaml")
    assert os.listdir(empty) == []


def test_resume_with_different_config(capsys, tmp_path, run_copy):
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", "train.epochs=2", "--resume", out=run_copy),
                      "--resume", "differs")
    # the shipped config without the run's overrides differs as well
    assert_user_error(*fail_train(capsys, tmp_path, "digits_pgdat", "--resume", out=run_copy), "differs")


def test_resume_with_overrides_but_no_config(capsys, tmp_path, run_copy):
    # `train --resume k=v`: argparse takes k=v as CONFIG; the CLI recognises it as an override and refuses it
    code, out, err = fail_train(capsys, tmp_path, "train.epochs=2", "--resume", out=run_copy)
    assert_user_error(code, out, err, "overrides are not accepted")


# ---------------------------------------------------------------- bad inputs: eval


def test_eval_nonexistent_path(capsys, tmp_path):
    assert_user_error(*run_cli(capsys, "eval", tmp_path / "nowhere"), "nowhere", "does not exist")


def test_eval_unrelated_file(capsys, cli_run_dir):
    assert_user_error(*run_cli(capsys, "eval", os.path.join(cli_run_dir, "config.yaml"), "--no-progress"),
                      "config.yaml")


def test_eval_truncated_checkpoint(capsys, run_copy):
    handle = os.path.join(run_copy, "checkpoints", "best.json")
    weights = os.path.join(run_copy, "checkpoints", read_meta(handle)["weights"])
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    before = tree_digest(run_copy)
    assert_user_error(*run_cli(capsys, "eval", run_copy, "--suite", "clean", "--n", "5", "--no-progress"),
                      os.path.basename(weights), "truncated")
    assert tree_digest(run_copy) == before


def test_eval_unknown_suite(capsys, cli_run_dir):
    before = tree_digest(cli_run_dir)
    assert_user_error(*run_cli(capsys, "eval", cli_run_dir, "--suite", "foo", "--n", "5", "--no-progress"),
                      "'foo'", "suite")
    assert_user_error(*run_cli(capsys, "eval", cli_run_dir, "--suite", "clean,pgd-0", "--n", "5", "--no-progress"),
                      "pgd-0")
    assert tree_digest(cli_run_dir) == before


def test_eval_negative_eps(capsys, cli_run_dir):
    assert_user_error(*run_cli(capsys, "eval", cli_run_dir, "--eps", "-1", "--suite", "clean", "--n", "5",
                               "--no-progress"), "eps", "-1")


def test_eval_zero_eps_refused(capsys, cli_run_dir):
    code, out, err = run_cli(capsys, "eval", cli_run_dir, "--eps", "0", "--suite", "clean,pgd-1", "--n", "5",
                             "--json", "--no-progress")
    assert_user_error(code, out, err, "eps")


@pytest.mark.parametrize("args, words", [
    (["--n", "0"], ["--n"]),
    (["--split", "bogus"], ["bogus", "split"]),
    (["--batch-size", "0"], ["--batch-size"]),
])
def test_eval_other_bad_options(capsys, cli_run_dir, args, words):
    assert_user_error(*run_cli(capsys, "eval", cli_run_dir, "--suite", "clean", *args, "--no-progress"), *words)


# ---------------------------------------------------------------- positive checks


def test_configs_lists_shipped(capsys):
    code, out, err = run_cli(capsys, "configs")
    assert code == 0 and err == ""
    assert "digits_pgdat" in out.split()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out, _ = capsys.readouterr()
    assert out.strip() == f"robustsparse {rs.__version__}"


def test_eval_json(capsys, cli_run_dir):
    before = tree_digest(cli_run_dir)
    code, out, err = run_cli(capsys, "eval", cli_run_dir, "--suite", "clean,pgd-2", "--n", "20", "--json",
                             "--no-progress")
    assert code == 0, err
    assert "Traceback" not in err
    result = json.loads(out)
    assert result["n"] == 20 and result["norm"] == "Linf" and result["eps"] == pytest.approx(0.1)
    acc = result["accuracy"]
    assert set(acc) == {"clean", "pgd-2"}
    assert 0.0 <= acc["pgd-2"] <= acc["clean"] <= 1.0
    assert result["worst_case"] <= acc["pgd-2"] + 1e-12
    desc = result["attacks"]["pgd-2"]
    assert "PGD-2" in desc and "eps=0.1" in desc
    assert tree_digest(cli_run_dir) == before  # evaluating writes nothing into the run


def test_eval_table_last_checkpoint(capsys, cli_run_dir):
    code, out, err = run_cli(capsys, "eval", cli_run_dir, "--which", "last", "--suite", "clean", "--n", "10",
                             "--no-progress")
    assert code == 0, err
    assert "10 images" in out and "| clean (no attack) |" in out


def test_real_entry_point_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    out = tmp_path / "newrun"
    proc = subprocess.run([sys.executable, "-m", "robustsparse", "train", str(bad), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustsparse: error: ") and "not valid YAML" in lines[0]
    assert proc.stdout == ""
    assert not out.exists()
