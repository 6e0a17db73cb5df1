"""The evaluation protocol: AutoAttack on the first k of n points (``autoattack_n``), every other attack on all n,
every row recording its points; the subset through the resumable state, ``rs.evaluate_run``, the CLI and a sweep."""
import json

import pytest

import robustsparse as rs
from robustsparse.api import evaluate_run
from robustsparse.attacks import autoattack as aa
from robustsparse.cli import main
from robustsparse.errors import UserError
from robustsparse.eval import evaluator as ev

N, K = 40, 12
TINY_AA = {"apgd-ce": 5, "apgd-t": 3, "fab-t": 3, "square": 40}  # the protocol is under test, not the budget
TINY_RUN = ["train.epochs=1", "model.options={width: 8}", "attack.steps=1", "train.val_attack_steps=1",
            "train.batch_size=256"]


@pytest.fixture
def small_aa(monkeypatch):
    for name, steps in TINY_AA.items():
        monkeypatch.setitem(aa.STANDARD_BUDGET, name, steps)


@pytest.fixture
def points_seen(monkeypatch):
    """The number of points handed to each AutoAttack component, per call, recorded."""
    seen = []
    real = ev.run_component

    def recording(name, model, x, y, robust, *args, **kwargs):
        seen.append((name, len(x), len(robust)))
        return real(name, model, x, y, robust, *args, **kwargs)
    monkeypatch.setattr(ev, "run_component", recording)
    return seen


def test_autoattack_runs_on_the_first_k_points_and_pgd_on_all(robust_digits_model, digits_test, small_aa,
                                                              points_seen):
    x, y = digits_test[0][:N], digits_test[1][:N]
    kw = dict(eps=0.1, progress=False, batch_size=8)
    res = rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-3,autoattack", autoattack_n=K, **kw)
    assert res.n == N and res.points == {"clean": N, "pgd-3": N, "autoattack": K}
    assert points_seen and all(size == K for _, size, _ in points_seen)  # AutoAttack never saw a later point
    # the same flags as the parts alone: PGD on all n, AutoAttack on x[:k] (identical chunks and chunk seeds)
    whole = rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-3", **kw)
    head = rs.evaluate(robust_digits_model, x[:K], y[:K], suite="clean,pgd-3,autoattack", **kw)
    assert res.accuracy["pgd-3"] == whole.accuracy["pgd-3"] and res.accuracy["clean"] == whole.accuracy["clean"]
    assert res.accuracy["autoattack"] == head.accuracy["autoattack"]
    assert res.autoattack_components == head.autoattack_components
    # the worst case and the clean accuracy beside it are over the k points every attack ran on
    assert res.worst_case_points == K and res.worst_case == head.worst_case
    assert res.clean_on_subset == head.accuracy["clean"]
    row = res.to_dict()
    assert row["points"]["autoattack"] == K and row["n"] == N and json.loads(json.dumps(row)) == row
    assert ev.column_label(row, "autoattack").endswith(f"first {K} of {N} points")
    assert ev.column_label(row, "pgd-3").endswith(f"{N} points") and "PGD-3" in ev.column_label(row, "pgd-3")
    table = res.table()
    assert f"| first {K} |" in table and f"| {N} |" in table and "on the AutoAttack points" in table


def test_a_subset_of_every_point_is_the_evaluation_without_one(robust_digits_model, digits_test):
    x, y = digits_test[0][:N], digits_test[1][:N]
    full = rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-2", eps=0.1, progress=False, autoattack_n=N)
    assert full.points == {"clean": N, "pgd-2": N} and full.worst_case_points == N and full.clean_on_subset is None
    assert "first" not in full.table()


@pytest.mark.parametrize("bad", [0, -3, N + 1, 2.5, True, "12"])
def test_a_bad_subset_size_is_one_line_user_error(robust_digits_model, digits_test, bad):
    x, y = digits_test[0][:N], digits_test[1][:N]
    with pytest.raises(UserError, match="autoattack_n") as info:
        rs.evaluate(robust_digits_model, x, y, suite="clean,autoattack", eps=0.1, progress=False, autoattack_n=bad)
    assert "\n" not in str(info.value) and f"{N}" in str(info.value)


def test_subset_resumes_from_its_state_and_refuses_another_subset(robust_digits_model, digits_test, small_aa,
                                                                  tmp_path, monkeypatch):
    """Killed inside an AutoAttack component on the subset, then resumed: the flags of an uninterrupted run."""
    monkeypatch.setenv("ROBUSTSPARSE_EVAL_SAVE_EVERY_S", "0")
    x, y = digits_test[0][:N], digits_test[1][:N]
    kw = dict(suite="clean,pgd-2,autoattack", eps=0.1, progress=False, batch_size=2, seed=2, run_checks=False)
    reference = rs.evaluate(robust_digits_model, x, y, autoattack_n=K, **kw)
    state = str(tmp_path / "state.json")

    class Killed(Exception):
        pass
    real, calls = aa.build_component, []

    def dies_in_apgd_t(name, *args, **kwargs):
        atk = real(name, *args, **kwargs)
        if name != "apgd-t":
            return atk

        def second_chunk_dies(xb, yb):
            calls.append(len(xb))
            if len(calls) == 2:
                raise Killed
            return atk(xb, yb)
        return second_chunk_dies
    monkeypatch.setattr(aa, "build_component", dies_in_apgd_t)
    with pytest.raises(Killed):
        rs.evaluate(robust_digits_model, x, y, state_path=state, autoattack_n=K, **kw)
    saved = json.load(open(state))
    assert saved["signature"]["autoattack_n"] == K and len(saved["flags"]["pgd-2"]) == N
    assert len(saved["flags"]["autoattack/apgd-ce"]) == K and saved["partial"]["autoattack/apgd-t"]["done"] == 2
    monkeypatch.setattr(aa, "build_component", real)
    resumed = rs.evaluate(robust_digits_model, x, y, state_path=state, autoattack_n=K, **kw)
    assert resumed.accuracy == reference.accuracy and resumed.points == reference.points
    assert resumed.autoattack_components == reference.autoattack_components
    final = json.load(open(state))
    assert final["partial"] == {} and final["flags"]["autoattack"] == final["flags"]["autoattack/square"]
    with pytest.raises(UserError, match="autoattack_n"):
        rs.evaluate(robust_digits_model, x, y, state_path=state, autoattack_n=K + 1, **kw)
    with pytest.raises(UserError, match="autoattack_n"):
        rs.evaluate(robust_digits_model, x, y, state_path=state, **kw)  # all points is another evaluation


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    """A tiny digits run whose config carries the protocol: eval.n=30, AutoAttack on the first 10."""
    from robustsparse.config import load_config
    from robustsparse.train import train
    run = tmp_path_factory.mktemp("protocol_run") / "run"
    train(load_config("digits_pgdat", TINY_RUN + ["eval.n=30", "eval.autoattack_n=10", "eval.suite=clean,pgd-2,"
                                                  "apgd-ce"]), str(run), progress=False)
    return str(run)


def test_evaluate_run_takes_the_protocol_from_the_run_and_all_overrides_it(protocol_run, small_aa):
    res, _ = evaluate_run(protocol_run, progress=False)
    assert res.n == 30 and res.points == {"clean": 30, "pgd-2": 30, "apgd-ce": 10}
    res, _ = evaluate_run(protocol_run, suite="clean,apgd-ce", n="all", autoattack_n="all", progress=False)
    assert res.n == 360 and res.points == {"clean": 360, "apgd-ce": 360}
    res, _ = evaluate_run(protocol_run, suite="clean,apgd-ce", n=20, autoattack_n=5, progress=False)
    assert res.points == {"clean": 20, "apgd-ce": 5}
    with pytest.raises(UserError, match="autoattack_n"):  # the run's 10 of an explicit 8 points
        evaluate_run(protocol_run, n=8, progress=False)
    res, _ = evaluate_run(protocol_run, suite="clean,pgd-2", n=8, progress=False)  # no AutoAttack: no subset
    assert res.points == {"clean": 8, "pgd-2": 8}


def test_cli_eval_autoattack_n_flag_and_its_errors(protocol_run, small_aa, capsys):
    code = main(["eval", protocol_run, "--suite", "clean,pgd-2,apgd-ce", "--autoattack-n", "6", "--json",
                 "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(out)
    assert row["n"] == 30 and row["points"] == {"clean": 30, "pgd-2": 30, "apgd-ce": 6}
    for bad, words in (("0", ">= 1"), ("-2", ">= 1"), ("31", "30 points"), ("many", "integer or all")):
        code = main(["eval", protocol_run, "--autoattack-n", bad, "--no-progress"])
        out, err = capsys.readouterr()
        assert code == 2 and len(err.splitlines()) == 1 and "--autoattack-n" in err and words in err, (bad, err)
        assert "Traceback" not in err


def test_config_checks_autoattack_n():
    from robustsparse.config import load_config
    assert load_config("fmnist_pgdat").eval.autoattack_n == 1000
    assert load_config("digits_pgdat").eval.autoattack_n is None  # digits: AutoAttack on every test point
    for bad in (["eval.autoattack_n=0"], ["eval.n=10", "eval.autoattack_n=11"], ["eval.autoattack_n=1.5"]):
        with pytest.raises(UserError, match="eval.autoattack_n"):
            load_config("digits_pgdat", bad)


def test_sweep_records_the_subset_and_names_it_in_its_table(protocol_run, small_aa, tmp_path):
    out = str(tmp_path / "sweep")
    data = rs.sweep([protocol_run], "0", suite="clean,apgd-ce", out=out, progress=False)
    assert data["settings"]["n"] == 30 and data["settings"]["autoattack_n"] == 10
    assert data["points"][0]["points"] == {"clean": 30, "apgd-ce": 10}
    md = open(f"{out}/sweep.md").read()
    assert "first 10 of 30 points" in md and "clean (no attack), 30 points" in md
    with pytest.raises(UserError, match="other settings"):  # the folder is bound to its protocol
        rs.sweep([protocol_run], "0", suite="clean,apgd-ce", out=out, autoattack_n="all", progress=False)
