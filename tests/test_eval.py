"""The evaluator: robust <= clean, worst case, AutoAttack parity with an independent torchattacks run, flags, state."""
import pytest
import torch
import torchattacks
from torch import nn

import robustsparse as rs
from robustsparse.errors import UserError
from robustsparse.eval import evaluator as ev


def _independent_autoattack(model, x, y, eps):
    """Every torchattacks component at the standard full budget on every clean-correct point; pointwise worst."""
    model.eval()
    robust = model(x).argmax(1) == y
    attacks = [torchattacks.APGD(model, eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
               torchattacks.APGDT(model, eps=eps, steps=100, n_restarts=1, seed=0, n_classes=10),
               torchattacks.FAB(model, eps=eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=10, seed=0),
               torchattacks.Square(model, eps=eps, n_queries=5000, n_restarts=1, p_init=0.8, seed=0)]
    for atk in attacks:
        x_adv = atk(x, y)
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
        with torch.no_grad():
            robust &= model(x_adv).argmax(1) == y
    return robust.float().mean().item()


def test_autoattack_matches_independent_torchattacks_run(robust_digits_model, digits_test):
    x, y = digits_test[0][:64], digits_test[1][:64]
    res = rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-20,autoattack", eps=0.1, progress=False)
    independent = _independent_autoattack(robust_digits_model, x, y, 0.1)
    assert 0 < res.accuracy["autoattack"] < res.accuracy["clean"], "the fixture must be partly robust"
    assert abs(res.accuracy["autoattack"] - independent) <= 0.02  # cascade vs all-points: same standard budget
    assert res.accuracy["autoattack"] <= res.accuracy["pgd-20"] + 0.01
    assert res.worst_case <= min(res.accuracy["pgd-20"], res.accuracy["autoattack"])
    comps = list(res.autoattack_components.values())
    assert comps == sorted(comps, reverse=True) and comps[-1] == pytest.approx(res.accuracy["autoattack"])
    assert "APGD-CE 100" in res.attacks["autoattack"] and "Square 5000" in res.attacks["autoattack"]


def test_robust_never_exceeds_clean_and_table_names_budgets(robust_digits_model, digits_test):
    x, y = digits_test[0][:60], digits_test[1][:60]
    res = rs.evaluate(robust_digits_model, x, y, suite="clean,fgsm,pgd-5x2", eps=0.1, progress=False)
    for item in ("fgsm", "pgd-5x2"):
        assert res.accuracy[item] <= res.accuracy["clean"]
    assert res.worst_case <= min(res.accuracy["fgsm"], res.accuracy["pgd-5x2"])
    table = res.table()
    assert "PGD-5" in table and "restarts=2" in table and "eps=0.1" in table and "worst case" in table
    assert res.to_dict()["n"] == 60


@pytest.mark.parametrize("suite", ["", "pgd-0", "pgd-5x0", "foo", "clean,clean", "pgd20"])
def test_bad_suites_are_refused(suite):
    with pytest.raises(UserError):
        ev.parse_suite(suite)


def test_bad_inputs_are_refused(robust_digits_model, digits_test):
    x, y = digits_test
    with pytest.raises(UserError, match="\\[0, 1\\]"):
        rs.evaluate(robust_digits_model, x * 2 - 0.5, y, suite="clean", eps=0.1, progress=False)
    with pytest.raises(UserError, match="eps"):
        rs.evaluate(robust_digits_model, x, y, suite="clean", eps=0.0, progress=False)
    with pytest.raises(UserError):
        rs.evaluate(robust_digits_model, x[:5], y[:4], suite="clean", eps=0.1, progress=False)


class _Softmax(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x).softmax(1)


class _Rounded(nn.Module):  # a non-differentiable input quantiser: classic gradient masking
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(torch.round(x * 4) / 4)


class _Noisy(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


@pytest.mark.parametrize("wrap,flag", [(_Softmax, "softmax output"), (_Rounded, "zero gradients"),
                                       (_Noisy, "randomness")])
def test_sanity_flags_explain_themselves(robust_digits_model, digits_test, wrap, flag):
    x, y = digits_test[0][:40], digits_test[1][:40]
    res = rs.evaluate(wrap(robust_digits_model), x, y, suite="clean,pgd-2", eps=0.1, progress=False)
    assert any(w.startswith(flag) for w in res.warnings), res.warnings
    clean = rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-2", eps=0.1, progress=False)
    assert clean.warnings == []


def test_black_box_beating_white_box_is_flagged():
    from robustsparse.eval.checks import check_black_box_beats_white_box
    assert check_black_box_beats_white_box(0.5, 0.4, 100)
    assert not check_black_box_beats_white_box(0.5, 0.5, 100)


def test_evaluation_state_resumes_and_refuses_a_different_evaluation(robust_digits_model, digits_test, tmp_path,
                                                                      monkeypatch):
    x, y = digits_test[0][:30], digits_test[1][:30]
    state = str(tmp_path / "state.json")
    first = rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-3", eps=0.1, state_path=state, progress=False)

    def no_attack(*a, **k):
        raise AssertionError("a finished attack must not run again on resume")
    monkeypatch.setattr(ev, "_attack_flags", no_attack)
    again = rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-3", eps=0.1, state_path=state, progress=False)
    assert again.accuracy == first.accuracy
    with pytest.raises(UserError, match="different evaluation"):
        rs.evaluate(robust_digits_model, x, y, suite="clean,pgd-3", eps=0.05, state_path=state, progress=False)
