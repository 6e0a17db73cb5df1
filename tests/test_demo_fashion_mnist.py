"""``robustsparse demo --data fashion_mnist``: the CLI picks the shipped fmnist_pgdat config and its protocol, and the
story runs end to end on the real Fashion-MNIST files (a tiny budget), names the points of every column, and
continues instead of redoing its stages."""
import json
import os

import pytest

from robustsparse.attacks import autoattack as aa
from robustsparse.cli import main
from robustsparse.config import load_config
from robustsparse.data import registry
from robustsparse.pipelines import demo

from test_fashion_mnist_real import FIX, _installed

TINY = ["train.epochs=1", "model.name=cnn", "model.options={width: 8}", "attack.steps=1", "train.val_attack_steps=1",
        "train.amp=fp32", "train.batch_size=256", "data.val_size=500", "prune.search_iters=2", "prune.search_batch=4",
        "eval.n=64", "eval.autoattack_n=8"]


@pytest.fixture
def captured_story(monkeypatch, tmp_path):
    """run_story replaced by a recorder that writes an empty report: the CLI's wiring only."""
    calls = []

    def fake(cfg, out, **kwargs):
        calls.append({"cfg": cfg, "out": out, **kwargs})
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "report.md")
        open(path, "w").write("report\n")
        return path
    monkeypatch.setattr(demo, "run_story", fake)
    monkeypatch.chdir(tmp_path)
    return calls


def test_cli_demo_data_picks_the_config_its_protocol_and_a_folder_that_continues(captured_story, capsys):
    assert main(["demo", "--data", "fashion_mnist", "--no-progress", "train.epochs=2"]) == 0
    call = captured_story[-1]
    cfg = call["cfg"]
    assert call["config_name"] == "fmnist_pgdat" and call["out"] == os.path.join("runs", "demo-fashion_mnist")
    assert (cfg.data.name, cfg.model.name, cfg.attack.eps, cfg.train.epochs) == ("fashion_mnist", "smallcnn", 0.1, 2)
    assert (cfg.eval.n, cfg.eval.autoattack_n, cfg.eval.split) == (None, 1000, "test")
    assert call["final_suite"] == "clean,pgd-20,autoattack"
    assert main(["demo", "--data", "fashion_mnist", "--no-progress"]) == 0  # the same folder again: continued
    assert captured_story[-1]["out"] == call["out"]
    assert main(["demo", "--quick", "--no-progress"]) == 0  # digits stays the default (make demo)
    call = captured_story[-1]
    assert call["config_name"] == "digits_pgdat" and call["cfg"].data.name == "digits"
    assert call["out"] == os.path.join("runs", "demo") and call["final_suite"] is None
    assert call["cfg"].eval.autoattack_n is None  # digits: AutoAttack on every test point
    capsys.readouterr()


@pytest.fixture
def small_fashion_mnist(monkeypatch):
    """The real files, with the official training set cut to its first 3,000 images (2,500 train + 500 val) and
    AutoAttack's budget cut: the wiring is under test, not the accuracy. The test split is the real 10,000."""
    if not _installed():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(FIX)
        pytest.skip(FIX)
    reader = registry.DATASETS["fashion_mnist"]

    def first_3000(split, root, **options):
        x, y = reader.load_fn(split, root, **options)
        return (x[:3000], y[:3000]) if split == "train" else (x, y)
    monkeypatch.setitem(registry.DATASETS, "fashion_mnist", registry._Reader(reader.spec_fn, first_3000,
                                                                             reader.options))
    for name, steps in {"apgd-ce": 5, "apgd-t": 3, "fab-t": 3, "square": 40}.items():
        monkeypatch.setitem(aa.STANDARD_BUDGET, name, steps)


def test_fashion_mnist_story_names_its_protocol_and_continues(small_fashion_mnist, tmp_path):
    out = str(tmp_path / "demo")
    cfg = load_config("fmnist_pgdat", TINY)
    kwargs = dict(density=0.2, methods=("awt",), final_suite=cfg.eval.suite, lams="0,1", progress=False,
                  config_name="fmnist_pgdat")
    report = demo.run_story(cfg, out, **kwargs)
    text = open(report).read()
    for needle in ("Fashion-MNIST (28×28)", "`fmnist_pgdat`", "first 64 points of the test split",
                   "AutoAttack (standard, full budget) on the first 8 of them", "first 8 of 64 points",
                   "clean (no attack), 64 points", "| awt | 0.2 |", "SMART lam=1", "(AutoAttack on the first 8"):
        assert needle in text, needle
    final = json.load(open(os.path.join(out, "autoattack.json")))
    assert set(final) == {"dense PGD-AT", "AWT ticket d=0.2", "SMART lam=0", "SMART lam=1"}
    for row in final.values():
        assert row["n"] == 64 and row["points"] == {"clean": 64, "pgd-20": 64, "autoattack": 8}
    grid = json.load(open(os.path.join(out, "grid", "results.json")))
    assert [r["points"] for r in grid] == [{"clean": 64, "pgd-20": 64}] * 2
    stamps = {p: os.path.getmtime(os.path.join(out, p)) for p in ("smart/checkpoints/last.json", "autoattack.json",
                                                                  "grid/dense/eval.json", "sweep/sweep.json")}
    assert demo.run_story(cfg, out, **kwargs) == report
    assert {p: os.path.getmtime(os.path.join(out, p)) for p in stamps} == stamps  # nothing retrained or re-attacked
