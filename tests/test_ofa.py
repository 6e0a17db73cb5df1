"""Once-for-all training (robustsparse/ofa/): SMART routing and masks, OAT/FLOAT structure, λ at load time,
the cost accounting (thop-style counts), tiny training steps, and the λ sweep."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import robustsparse as rs
from robustsparse.config import load_config
from robustsparse.models.dual_bn import DualBatchNorm2d
from robustsparse.ofa import at_lambda, expert_mask_tensors, make_conditional, mask_iou, path_cost, smart_path
from robustsparse.ofa.oat import BatchNormFiLM
from robustsparse.ofa.smart_masks import DRAFT_ROUNDS, _DualMask, expert_masks
from robustsparse.train.objectives import build_objective

OPTIONS = dict(lambdas=[0.0, 0.1, 0.2, 0.3, 0.4, 1.0], encoding="rand", encoding_dim=128, noise_init=0.25,
               density_clean=0.5, density_adv=0.5, overlap="complementary", split_from=0, mask_source="random",
               mix="logit")


def conditional(method, arch="cnn", shape=(1, 8, 8), seed=0, base=None, **options):
    torch.manual_seed(seed)
    model = copy.deepcopy(base) if base is not None else rs.build_model(arch, shape[0], 10, shape[1:],
                                                                        **({"width": 8} if arch == "cnn" else {}))
    return make_conditional(model, {"method": method, "options": {**OPTIONS, **options}, "seed": seed})


def tiny_cfg(method, *overrides):
    return load_config("digits_pgdat", [f"train.method={method}", "train.epochs=1", "attack.steps=2",
                                        "train.val_attack_steps=1", "model.options={width: 8}", *overrides])


@pytest.fixture(scope="module")
def smart_run(tmp_path_factory):
    """A one-epoch SMART run on digits with nested masks (d_c 0.3 inside d_a 0.6), so the union is not everything."""
    out = str(tmp_path_factory.mktemp("ofa") / "smart")
    cfg = tiny_cfg("smart", "ofa.overlap=nested", "ofa.density_clean=0.3", "ofa.density_adv=0.6")
    torch.manual_seed(cfg.train.seed)
    from robustsparse.train.spec import build_from_spec, model_spec
    initial = build_from_spec(model_spec(cfg))
    rs.train(cfg, out, progress=False)
    return out, initial


# --- structure and counts -------------------------------------------------------------------------------------

def test_resnet34_thop_counts_dense_oat_and_smart_ratio():
    torch.manual_seed(0)
    base = rs.build_model("resnet34", 3, 10, (32, 32))
    dense = path_cost(base, (3, 32, 32))
    assert dense.params == 21_282_122
    oat = conditional("oat", base=base, encoding="scalar")  # FiLM input size 1: resnet_OAT.py's thop count
    assert sum(isinstance(m, BatchNormFiLM) for m in oat.modules()) == 33  # stem + 2 per block, no shortcut BN
    oat_cost = path_cost(at_lambda(oat, 1.0), (3, 32, 32), oat)
    assert oat_cost.params == 31_403_978
    assert oat_cost.extra_ops > 0
    del oat
    smart = conditional("smart", base=base)
    exported = path_cost(at_lambda(smart, 1.0), (3, 32, 32), smart)  # the plain sparse model rs.load returns
    for route in ("clean", "adv"):  # the same count on the routed model, without exporting 21M weights again
        with smart_path(smart, route):
            cost = path_cost(smart, (3, 32, 32))
        assert cost.params == 21_282_122  # one BN set, like the dense model
        assert cost.nonzero_params <= oat_cost.params / 2.7
        assert cost.sparse_macs < 0.51 * dense.macs
    assert (exported.params, exported.nonzero_params, exported.sparse_macs) == \
        (cost.params, cost.nonzero_params, cost.sparse_macs)


def test_wrn_oat_count_matches_method_notes():
    base = rs.build_model("wrn-40-2", 3, 10, (32, 32))  # method-notes §3(b).3: 2,243,546 dense, 3,226,682 OAT
    oat = conditional("oat", base=base, encoding="scalar")
    assert (path_cost(base, (3, 32, 32)).params, path_cost(at_lambda(oat, 0.0), (3, 32, 32)).params) == \
        (2_243_546, 3_226_682)


def test_digits_smart_path_has_at_most_half_of_oat_parameters():
    base = rs.build_model("cnn", 1, 10, (8, 8), width=64)
    oat = conditional("oat", base=base)
    smart = conditional("smart", base=base)
    oat_params = path_cost(at_lambda(oat, 1.0), (1, 8, 8), oat).params
    for lam in (0.0, 1.0):
        assert path_cost(at_lambda(smart, lam), (1, 8, 8), smart).nonzero_params <= oat_params / 2


# --- SMART routing --------------------------------------------------------------------------------------------

def _path_grads(model, route, x, y):
    model.zero_grad(set_to_none=True)
    with smart_path(model, route):
        F.cross_entropy(model(x), y).backward()
    return {n: m.weight.grad.clone() for n, m in model.named_modules() if isinstance(m, _DualMask)}


@pytest.mark.parametrize("overlap,d_c,d_a", [("complementary", 0.5, 0.5), ("independent", 0.6, 0.6),
                                             ("nested", 0.3, 0.6), ("alternating", 0.4, 0.5)])
def test_paths_use_their_own_weights_and_bn(overlap, d_c, d_a, digits_test):
    x, y = digits_test[0][:32], digits_test[1][:32]
    model = conditional("smart", overlap=overlap, density_clean=d_c, density_adv=d_a).train()
    clean_mask, adv_mask = expert_mask_tensors(model)
    g_clean, g_adv = _path_grads(model, "clean", x, y), _path_grads(model, "adv", x, y)
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, _DualMask)):
        mc, ma = clean_mask[f"{name}.weight"], adv_mask[f"{name}.weight"]
        assert abs(mc.mean().item() - d_c) < 0.05 and abs(ma.mean().item() - d_a) < 0.05
        assert torch.all(g_clean[name][mc == 0] == 0) and g_clean[name][mc == 1].abs().sum() > 0
        assert torch.all(g_adv[name][ma == 0] == 0) and g_adv[name][ma == 1].abs().sum() > 0
        shared = (g_clean[name] != 0) & (g_adv[name] != 0)
        if overlap in ("complementary", "alternating"):
            assert not shared.any() and torch.all(mc + ma <= 1)
        if overlap == "nested":
            assert torch.all(mc <= ma)
    iou = mask_iou(model)
    assert (iou == 0) if overlap in ("complementary", "alternating") else (iou > 0.2)
    # separate BN statistics: a clean-path forward moves only bn_clean's running mean, an adversarial one only bn_adv's
    bns = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    before = [(b.bn_clean.running_mean.clone(), b.bn_adv.running_mean.clone()) for b in bns]
    with torch.no_grad(), smart_path(model, "clean"):
        model(x)
    assert all(not torch.equal(b.bn_clean.running_mean, c) and torch.equal(b.bn_adv.running_mean, a)
               for b, (c, a) in zip(bns, before))
    with torch.no_grad(), smart_path(model, "adv"):
        model(x)
    assert all(not torch.equal(b.bn_adv.running_mean, a) for b, (_, a) in zip(bns, before))


def test_export_is_bit_identical_to_the_routed_forward(digits_test):
    x = digits_test[0][:16]
    model = conditional("smart", overlap="independent", density_clean=0.4, density_adv=0.7).eval()
    with torch.no_grad():
        for lam, route in ((0.0, "clean"), (1.0, "adv"), (0.3, ("weight", 0.3))):
            with smart_path(model, route):
                expected = model(x)
            assert torch.equal(at_lambda(model, lam, "weight")(x), expected)
        mixed = at_lambda(model, 0.3, "logit")(x)
        assert torch.allclose(mixed.exp().sum(1), torch.ones(len(x)), atol=1e-5)  # log-probabilities


def test_learned_masks_keep_exact_densities_and_get_gradients(digits_test):
    x, y = digits_test[0][:32], digits_test[1][:32]
    model = conditional("smart", mask_source="learned", overlap="complementary", density_clean=0.3,
                        density_adv=0.5).train()
    with smart_path(model, "adv"):
        F.cross_entropy(model(x), y).backward()
    layer = next(m for m in model.modules() if isinstance(m, _DualMask))
    assert layer.score_adv.grad is not None and layer.score_adv.grad.abs().sum() > 0
    assert layer.score_clean.grad is None or layer.score_clean.grad.abs().sum() == 0
    for m in model.modules():
        if isinstance(m, _DualMask):
            assert int(m.mask_clean.sum()) == m.k_clean and int(m.mask_adv.sum()) == m.k_adv
            assert not (m.mask_clean * m.mask_adv).any()


# --- training, persistence, loading ---------------------------------------------------------------------------

def test_masks_exact_through_training_and_save_load(smart_run):
    out, initial = smart_run
    clean0, adv0 = expert_mask_tensors(initial)
    from robustsparse.runs.checkpoint import find_checkpoint, load_checkpoint
    tensors = load_checkpoint(find_checkpoint(out, prefer="last"))[0]
    for key in clean0:
        module = key[:-len(".weight")]
        assert torch.equal(tensors[f"model.{module}.mask_clean"], clean0[key])  # unchanged by 19 SGD steps
        assert torch.equal(tensors[f"model.{module}.mask_adv"], adv0[key])
        weight, union = tensors[f"model.{key}"], torch.maximum(clean0[key], adv0[key])
        assert (union == 0).any() and torch.all(weight[union == 0] == 0)  # outside both experts: exactly 0
    for lam, mask in ((0.0, clean0), (1.0, adv0)):
        plain = rs.load(out, which="last", lam=lam)
        params = dict(plain.named_parameters())
        for key in mask:
            assert torch.equal(params[key].detach(), tensors[f"model.{key}"] * mask[key])
        assert not any(isinstance(m, (DualBatchNorm2d, _DualMask)) for m in plain.modules())


def test_load_needs_lam_for_conditional_models_only(smart_run, tmp_path):
    out, _ = smart_run
    with pytest.raises(rs.UserError, match="once-for-all"):
        rs.load(out)
    with pytest.raises(rs.UserError, match=r"\[0, 1\]"):
        rs.load(out, lam=1.5)
    with pytest.raises(rs.UserError, match="switch, weight, logit"):
        rs.load(out, lam=0.5, mix="average")
    from robustsparse.runs.checkpoint import save_checkpoint
    from robustsparse.train.spec import build_from_spec, model_spec
    dense = tiny_cfg("standard")
    spec = model_spec(dense)
    state = {f"model.{k}": v for k, v in build_from_spec(spec).state_dict().items()}
    save_checkpoint(str(tmp_path / "dense"), "best", state, {"model_spec": spec, "config": dense.to_dict(),
                                                              "epoch": 1, "step": 0})
    assert rs.load(str(tmp_path / "dense")) is not None
    with pytest.raises(rs.UserError, match="not a once-for-all"):
        rs.load(str(tmp_path / "dense"), lam=0.3)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"val_clean_acc_lam0", "val_robust_acc"} <= set(metrics[-1])


@pytest.mark.parametrize("method", ["smart", "oat", "float"])
def test_a_few_training_steps_lower_the_loss(method, digits_test):
    cfg = tiny_cfg(method)
    x, y = digits_test[0][:64], digits_test[1][:64]
    torch.manual_seed(0)
    from robustsparse.train.spec import build_from_spec, model_spec
    model = build_from_spec(model_spec(cfg)).train()
    step = build_objective(model, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = step(x, y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0]


def test_float_is_deterministic_at_inference_and_noise_depends_on_lambda(digits_test):
    x = digits_test[0][:16]
    model = conditional("float").eval()
    with torch.no_grad():
        m1 = at_lambda(model, 1.0)
        assert torch.equal(m1(x), m1(x))
        assert not torch.equal(m1(x), at_lambda(model, 0.5)(x))
    assert path_cost(at_lambda(model, 0.0), (1, 8, 8)).extra_ops == 0 < path_cost(m1, (1, 8, 8)).extra_ops


def test_alternating_draft_shares_every_band_of_a_common_ranking():
    n, k = 2000, 1000
    scores = torch.randperm(n).float()  # both experts rank the weights the same way, as AWT and NTT tickets do
    m_clean, m_adv = expert_masks(scores, scores, k, k, "alternating")
    assert int(m_clean.sum()) == int(m_adv.sum()) == k and not (m_clean & m_adv).any()
    ranked = torch.sort(-scores, stable=True).indices
    lead = (m_adv[ranked].cumsum(0) - m_clean[ranked].cumsum(0)).abs().max()
    assert lead <= k // DRAFT_ROUNDS  # in every top-j band the adversarial expert leads by one round at most
    c_first, a_first = expert_masks(scores, scores, k, k, "complementary")
    assert torch.equal(a_first[ranked[:k]], torch.ones(k, dtype=torch.bool))  # complementary: all the top to M_a
    # with fewer picks than rounds the draft alternates one by one, the adversarial expert first
    m_clean, m_adv = expert_masks(torch.arange(10.0), torch.arange(10.0), 3, 4, "alternating")
    assert m_adv.nonzero().flatten().tolist() == [3, 5, 7, 9] and m_clean.nonzero().flatten().tolist() == [4, 6, 8]
    # without a conflict each expert gets its own top-k, as under the other policies
    m_clean, m_adv = expert_masks(torch.arange(10.0), -torch.arange(10.0), 5, 5, "alternating")
    assert m_clean.nonzero().flatten().tolist() == [5, 6, 7, 8, 9] and m_adv.nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("overlap,ratio_above", [("complementary", 2.0), ("alternating", None)])
def test_magnitude_masks_keep_both_experts_at_theta0_scale_only_when_drafted(overlap, ratio_above):
    model = conditional("smart", mask_source="magnitude", overlap=overlap)
    clean, adv = expert_mask_tensors(model)
    for key in clean:
        w = model.get_parameter(key).detach().abs()
        ratio = float(w[adv[key] > 0].median() / w[clean[key] > 0].median())
        assert ratio > ratio_above if ratio_above else 0.9 < ratio < 1.1, (key, ratio)


def test_bad_options_are_user_errors():
    with pytest.raises(rs.UserError, match="complementary"):
        tiny_cfg("smart", "ofa.density_clean=0.7", "ofa.density_adv=0.5")
    with pytest.raises(rs.UserError, match="alternating needs"):
        tiny_cfg("smart", "ofa.overlap=alternating", "ofa.density_clean=0.7", "ofa.density_adv=0.5")
    with pytest.raises(rs.UserError, match="learned"):
        tiny_cfg("smart", "ofa.overlap=alternating", "ofa.mask_source=learned")
    with pytest.raises(rs.UserError, match="split_from"):
        conditional("smart", split_from=99)


# --- the sweep ------------------------------------------------------------------------------------------------

def test_sweep_writes_json_markdown_png_and_resumes(smart_run, tmp_path, monkeypatch):
    out, _ = smart_run
    dest = str(tmp_path / "sweep")
    data = rs.sweep([out], [0, 1], suite="clean,pgd-2", out=dest, n=24, progress=False)
    assert {p["lam"] for p in data["points"]} == {0.0, 1.0}
    for name in ("sweep.json", "sweep.md", "tradeoff.png"):
        assert os.path.getsize(os.path.join(dest, name)) > 0
    table = open(os.path.join(dest, "sweep.md")).read()
    assert "PGD-2 L∞ eps=0.1" in table and "non-zero params" in table
    import robustsparse.pipelines.sweep as sweep_module  # the name the sweep calls, not the evaluator's own
    monkeypatch.setattr(sweep_module, "evaluate", lambda *a, **k: pytest.fail("a finished point was re-evaluated"))
    again = rs.sweep([out], [0, 1], suite="clean,pgd-2", out=dest, n=24, progress=False)
    assert again["points"] == json.load(open(os.path.join(dest, "sweep.json")))["points"]
    with pytest.raises(pytest.fail.Exception, match="re-evaluated"):  # the guard above can fail: a new λ trips it
        rs.sweep([out], [0.5], suite="clean,pgd-2", out=dest, n=24, progress=False)
    with pytest.raises(rs.UserError, match="other settings"):
        rs.sweep([out], [0], suite="clean", out=dest, n=12, progress=False)


def test_an_interrupted_sweep_leaves_a_report_of_its_finished_points(smart_run, tmp_path, monkeypatch):
    out, _ = smart_run
    dest = str(tmp_path / "sweep")
    import robustsparse.pipelines.sweep as sweep_module
    real, calls = sweep_module.evaluate, []

    def evaluate_then_stop(*a, **k):  # the machine goes away while λ = 1 is being attacked
        calls.append(k["suite"])
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(sweep_module, "evaluate", evaluate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        rs.sweep([out], [0, 1], suite="clean,pgd-2", out=dest, n=24, progress=False)
    accuracy_table = open(os.path.join(dest, "sweep.md")).read().split("## Cost")[0]
    rows = [r for r in accuracy_table.splitlines() if r.startswith("| ")]
    assert len(rows) == 2 and "| smart | smart | 0 |" in rows[1]  # header + the λ = 0 point, both items in it
    assert rows[1].count("%") == 2 and os.path.getsize(os.path.join(dest, "tradeoff.png")) > 0


def test_awt_masks_are_found_at_the_first_step(digits_test, capsys):
    cfg = tiny_cfg("smart", "ofa.mask_source=awt", "ofa.overlap=complementary", "ofa.density_clean=0.3",
                   "ofa.density_adv=0.4", "prune.search_iters=1", "prune.search_batch=8")
    from robustsparse.train.spec import build_from_spec, model_spec
    torch.manual_seed(0)
    model = build_from_spec(model_spec(cfg)).train()
    assert int(model.smart_masks_ready) == 0
    step = build_objective(model, cfg)
    assert torch.isfinite(step(digits_test[0][:16], digits_test[1][:16]).loss)
    assert int(model.smart_masks_ready) == 1
    err = capsys.readouterr().err  # the searches run inside a training step: no bars of their own (--no-progress)
    assert "search" not in err and "SynFlow" not in err
    clean, adv = expert_mask_tensors(model)
    assert abs(clean.density() - 0.3) < 0.01 and abs(adv.density() - 0.4) < 0.01 and mask_iou(model) == 0


def test_cli_eval_needs_lam_and_sweep_runs(smart_run, tmp_path, capsys):
    from robustsparse.cli import main
    out, _ = smart_run
    assert main(["eval", out, "--suite", "clean", "--n", "8", "--no-progress"]) == 2
    assert "--lam" in capsys.readouterr().err
    assert main(["eval", out, "--lam", "1", "--suite", "clean", "--n", "8", "--no-progress"]) == 0
    assert main(["sweep", out, "--lams", "0,0.5", "--suite", "clean", "--n", "8", "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    assert "| smart | smart | 0.5 | logit |" in capsys.readouterr().out


def test_oat_on_a_network_without_bn_conditions_after_every_conv():
    """SmallCNN has no BN: FiLM after BN (OAT's code) would leave one network for every λ; film_at=auto puts FiLM
    after every convolution instead, so λ changes the output, and film_at=bn is refused with the fix named."""
    from robustsparse.ofa.oat import ConvFiLM
    torch.manual_seed(0)
    base = rs.build_model("smallcnn", 1, 10, (28, 28))
    oat = conditional("oat", base=base)
    convs = [m for m in oat.modules() if isinstance(m, ConvFiLM)]
    assert len(convs) == 4 and not any(isinstance(m, BatchNormFiLM) for m in oat.modules())
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():  # each FiLM starts at the identity: the unconverted network's outputs at every λ
        assert torch.allclose(at_lambda(oat, 0.3)(x), base.eval()(x), atol=1e-5)
    # and λ-dependence is learnable: one step on the FiLM MLPs makes λ = 0 and λ = 1 differ
    films = [p for m in convs for p in m.film.parameters()]
    opt = torch.optim.SGD(films, lr=0.5)
    (at_lambda(oat, 0.0)(x).logsumexp(1).mean() - at_lambda(oat, 1.0)(x).logsumexp(1).mean()).backward()
    opt.step()
    from robustsparse.ofa.oat import encode
    with torch.no_grad():
        codes = encode(oat, torch.tensor([0.0, 1.0]))
        for m in convs:  # every FiLM's (μ, σ) now depends on λ (at the identity start it was exactly the bias)
            mu_sigma = m.film.mlp(codes)
            assert (mu_sigma[0] - mu_sigma[1]).abs().max() > 0
    with pytest.raises(rs.UserError, match="film_at=conv"):
        conditional("oat", base=base, film_at="bn")
