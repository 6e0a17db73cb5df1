"""``robustsparse eval --model pkg.module:function --weights W.safetensors --data D``: a model trained elsewhere
runs through the one evaluator (eval/external.py); pickles are refused unread; ``--eps`` takes fractions."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import robustsparse as rs
from robustsparse.cli import main
from robustsparse.errors import UserError
from robustsparse.eval import parse_eps
from robustsparse.eval.external import check_safetensors, load_external_model

sys.path.insert(0, os.path.dirname(__file__))
from fixtures import tiny_net  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "tests.fixtures:tiny_net"


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory):
    """tiny_net after 2 clean epochs on digits (~1 s): accurate enough that clean and PGD accuracies differ."""
    torch.manual_seed(0)
    x, y = rs.load_dataset("digits", split="train")
    net = tiny_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(2):
        for i in range(0, len(y), 64):
            loss = F.cross_entropy(net(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = str(tmp_path_factory.mktemp("ext") / "w.safetensors")
    save_file(net.state_dict(), path)
    return path, net.eval()


def _console_script():
    script = os.path.join(os.path.dirname(sys.executable), "robustsparse")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "robustsparse"]


def test_cli_evaluates_a_model_brought_from_elsewhere(trained_weights, tmp_path):
    weights, net = trained_weights
    state = str(tmp_path / "state.json")
    cmd = _console_script() + ["eval", "--model", SPEC, "--weights", weights, "--data", "digits",
                               "--suite", "clean,pgd-20", "--eps", "8/255", "--n", "100", "--state", state,
                               "--json", "--no-progress"]
    # The console script, not `python -m`: the user's module must import from the current folder all the same.
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["n"] == 100 and got["eps"] == pytest.approx(8 / 255, abs=1e-15)
    assert "PGD-20" in got["attacks"]["pgd-20"] and "eps=0.03137" in got["attacks"]["pgd-20"]
    # The same numbers as the evaluator run directly on the same model, images and seed.
    x, y = rs.load_dataset("digits", split="test")
    direct = rs.evaluate(net, x[:100], y[:100], suite="clean,pgd-20", eps=8 / 255, num_classes=10, progress=False)
    assert got["accuracy"] == direct.accuracy
    assert got["accuracy"]["clean"] > 0.8 and got["accuracy"]["pgd-20"] < got["accuracy"]["clean"]
    # The state file resumes (nothing to redo) and is refused for other weights.
    again = rs.evaluate_external(SPEC, weights, "digits", suite="clean,pgd-20", eps="8/255", n=100,
                                 state_path=state, progress=False)
    assert again.accuracy == direct.accuracy
    other = str(tmp_path / "other.safetensors")
    save_file({k: v + 0.01 for k, v in net.state_dict().items()}, other)
    with pytest.raises(UserError):
        rs.evaluate_external(SPEC, other, "digits", suite="clean,pgd-20", eps="8/255", n=100, state_path=state,
                             progress=False)


class _Marker:
    """Unpickling this creates a folder: proof of whether a file was ever unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_weights_are_refused_without_unpickling(tmp_path, capsys, zip_format):
    marker = str(tmp_path / "was-unpickled")
    for name in ("w.pt", "w.safetensors"):  # the header decides, not the name
        path = str(tmp_path / name)
        torch.save({"weight": torch.zeros(2), "payload": _Marker(marker)}, path,
                   _use_new_zipfile_serialization=zip_format)
        assert main(["eval", "--model", SPEC, "--weights", path, "--data", "digits", "--suite", "clean"]) == 2
        err = capsys.readouterr().err.strip()
        assert "never unpickles" in err and ("zip" in err) == zip_format and len(err.splitlines()) == 1, err
    assert not os.path.exists(marker)


def test_bad_external_inputs_are_clear_errors(trained_weights, tmp_path):
    weights, _ = trained_weights
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserError, match="not a safetensors file"):
        check_safetensors(str(junk))
    with pytest.raises(UserError, match="package.module:function"):
        load_external_model("tests/fixtures.py", weights)
    with pytest.raises(UserError, match="cannot import"):
        load_external_model("no_such_pkg.nets:build", weights)
    with pytest.raises(UserError, match="no function"):
        load_external_model("tests.fixtures:nope", weights)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"1.weight": torch.zeros(3, 1, 3, 3)}, str(wrong))
    with pytest.raises(UserError, match="do not fit"):
        load_external_model(SPEC, str(wrong))
    with pytest.raises(UserError, match=r"fails on one synthetic image of shape \(3, 32, 32\)"):
        rs.evaluate_external(SPEC, weights, "synthetic", n=4)  # 3x32x32 synthetic images, a 1x8x8 model


def test_cli_eval_option_combinations(trained_weights, capsys):
    weights, _ = trained_weights
    assert main(["eval", "--model", SPEC, "--weights", weights]) == 2
    assert "missing --data" in capsys.readouterr().err
    assert main(["eval", "runs/x", "--model", SPEC, "--weights", weights, "--data", "digits"]) == 2
    assert "RUN" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "eval needs a RUN" in capsys.readouterr().err
    assert main(["eval", "--model", SPEC, "--weights", weights, "--data", "digits", "--eps", "8/0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fraction such as 8/255" in err and len(err.splitlines()) == 1


def test_parse_eps_accepts_fractions_and_numbers():
    assert parse_eps("8/255") == 8 / 255 and parse_eps(" 2 / 255 ") == 2 / 255
    assert parse_eps("0.1") == 0.1 and parse_eps(0.5) == 0.5 and parse_eps("1e-2") == 0.01
    for bad in ("8/0", "-1", "0", "abc", "nan", "inf", "1/2/3", True):
        with pytest.raises(UserError):
            parse_eps(bad)
