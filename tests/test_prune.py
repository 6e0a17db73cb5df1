"""Pruning pipeline: tickets from every method, masks exact through training/save/load, searches, compare grid."""
import json
import os

import pytest
import torch

import robustsparse as rs
from robustsparse.cli import main
from robustsparse.config import load_config
from robustsparse.errors import UserError
from robustsparse.pipelines.ticket import prune_to_folder
from robustsparse.sparse.ticket import load_ticket
from robustsparse.sparse import get_mask, prunable_parameters
from robustsparse.train import train

TINY = ["model.options={width: 8}", "attack.steps=2", "train.epochs=2", "train.val_attack_steps=2",
        "train.batch_size=128", "prune.synflow_rounds=5", "prune.search_iters=4", "prune.search_batch=8",
        "prune.mask_update_every=2", "prune.samples=40"]


@pytest.mark.parametrize("method", ["random", "magnitude", "snip", "grasp", "synflow", "ntt", "awt"])
def test_every_method_writes_a_ticket_with_the_requested_density(tmp_path, method):
    cfg = load_config("digits_pgdat", TINY + [f"prune.method={method}", "prune.density=0.1"])
    ticket = prune_to_folder(cfg, str(tmp_path / "t"), progress=False)
    assert ticket.mask.density() == pytest.approx(0.1, abs=1e-4)
    assert all(d > 0 for d in ticket.mask.layer_density().values()), "no layer may be removed entirely"
    state, meta = load_ticket(str(tmp_path / "t"))
    assert meta["prune"]["method"] == method and meta["prune"]["seconds"] > 0
    for name, weight in state.items():
        if name.endswith(".weight") and name[: -len("weight")] + "weight_mask" in state:
            assert torch.all(weight[state[name[: -len("weight")] + "weight_mask"] == 0] == 0)
    assert os.path.exists(tmp_path / "t" / "mask_report.md")


def test_ticket_mask_survives_training_save_and_load(tmp_path):
    cfg = load_config("digits_pgdat", TINY + ["prune.method=snip", "prune.density=0.05"])
    prune_to_folder(cfg, str(tmp_path / "t"), progress=False)
    ticket_state, _ = load_ticket(str(tmp_path / "t"))
    run_cfg = load_config("digits_pgdat", TINY + [f"train.ticket={tmp_path / 't'}"])
    train(run_cfg, str(tmp_path / "run"), progress=False)
    for which in ("best", "last"):
        model = rs.load(str(tmp_path / "run"), which=which)
        mask = get_mask(model)
        assert mask is not None and mask.density() == pytest.approx(0.05, abs=1e-4)
        weights = prunable_parameters(model)
        for name, m in mask.items():
            assert torch.equal(m, ticket_state[name + "_mask"]), "the mask must not change during training"
            assert torch.all(weights[name][m == 0] == 0), f"{name}: a pruned weight became non-zero"
        nonzero = sum(int((w != 0).sum()) for w in weights.values())
        assert nonzero == pytest.approx(mask.kept(), abs=2)  # trained kept weights are (almost surely) non-zero
    x, y = rs.load_dataset("digits", split="test")
    assert rs.load(str(tmp_path / "run"))(x[:4]).shape == (4, 10)


def test_a_ticket_for_another_architecture_is_refused(tmp_path):
    cfg = load_config("digits_pgdat", TINY + ["prune.method=magnitude"])
    prune_to_folder(cfg, str(tmp_path / "t"), progress=False)
    other = load_config("digits_pgdat", TINY + ["model.options={width: 16}", f"train.ticket={tmp_path / 't'}"])
    with pytest.raises(UserError, match="ticket"):
        train(other, str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("overrides", [["prune.mode=weights"], ["prune.mode=mask_only"],
                                       ["prune.ntk_mode=projected"], ["prune.points=both"],
                                       ["prune.attack_target=student"], ["prune.bn_stats=batch"],
                                       ["prune.bn_stats=batch", "prune.attack_target=student"]])
def test_awt_search_variants_run_and_keep_exact_density(tmp_path, overrides):
    cfg = load_config("digits_pgdat", TINY + ["prune.method=awt", "prune.density=0.1"] + overrides)
    ticket = prune_to_folder(cfg, str(tmp_path / "t"), progress=False)
    assert ticket.mask.density() == pytest.approx(0.1, abs=1e-4)
    log = ticket.info["log"]
    assert log and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_calibrate_bn_sets_each_layer_to_its_batch_statistics_and_leaves_eval_mode():
    from robustsparse.models.bn import calibrate_bn
    torch.manual_seed(0)
    model = rs.build_model("cnn", 1, 10, (8, 8), width=8)
    x = torch.rand(32, 1, 8, 8)
    bn = model.net.features[1]
    momentum = bn.momentum
    calibrate_bn(model, None, x)
    with torch.no_grad():
        pre = model.net.features[0](model.normalize(x))  # the first BN's input
    assert not model.training and bn.momentum == momentum
    assert torch.allclose(bn.running_mean, pre.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, pre.var((0, 2, 3), unbiased=True), rtol=1e-4)
    params = {n: q * 2 for n, q in model.named_parameters()}  # stand-in weights: statistics follow them
    calibrate_bn(model, params, x)
    assert torch.allclose(bn.running_mean, 2 * pre.mean((0, 2, 3)), atol=1e-5)


def test_a_batch_statistics_search_brings_the_ticket_closer_to_dense_under_batch_statistics(tmp_path):
    """What bn_stats=batch is for: the kernel that training's batch-statistics BN sees gets closer to dense."""
    import copy
    from robustsparse.analysis.ntk import empirical_ntk, ntk_distance
    from robustsparse.models.bn import calibrate_bn
    from robustsparse.sparse import load_model_state
    base = TINY + ["prune.method=awt", "prune.density=0.1", "prune.search_iters=12", "prune.search_batch=4",
                   "prune.mask_update_every=100", "prune.bn_stats=batch", "prune.bn_samples=64"]
    searched = prune_to_folder(load_config("digits_pgdat", base), str(tmp_path / "a"), progress=False)
    start = prune_to_folder(load_config("digits_pgdat", base + ["prune.search_iters=0"]), str(tmp_path / "s"),
                            progress=False)
    assert all(torch.equal(searched.mask[n], start.mask[n]) for n in start.mask.keys())  # the mask is kept
    x, _ = rs.load_dataset("digits", split="train")
    torch.manual_seed(0)
    dense = rs.build_model("cnn", 1, 10, (8, 8), width=8)
    calibrate_bn(dense, None, x[:64])
    probe = x[100:108]

    def distance(ticket):
        sparse = copy.deepcopy(dense)
        load_model_state(sparse, ticket.state)
        calibrate_bn(sparse, None, x[:64])
        return float(ntk_distance(empirical_ntk(sparse, probe), empirical_ntk(dense, probe)))

    assert distance(searched) < 0.9 * distance(start)


def test_fixed_allocation_keeps_the_initial_layer_counts_and_rescope_may_not(tmp_path):
    base = TINY + ["prune.method=awt", "prune.density=0.05", "prune.scope=global", "prune.init_method=magnitude",
                   "prune.search_iters=6",
                   "prune.mask_update_every=2", "prune.search_lr=0.05"]
    magnitude = prune_to_folder(load_config("digits_pgdat", TINY + ["prune.method=magnitude", "prune.density=0.05"]),
                                str(tmp_path / "m"), progress=False).mask
    fixed = prune_to_folder(load_config("digits_pgdat", base), str(tmp_path / "f"), progress=False).mask
    counts = {n: int(m.sum()) for n, m in magnitude.items()}
    assert {n: int(m.sum()) for n, m in fixed.items()} == counts  # same per-layer budget as global |θ₀| ...
    assert any(not torch.equal(fixed[n], magnitude[n]) for n in counts)  # ... but the search chose other weights
    rescope = prune_to_folder(load_config("digits_pgdat", base + ["prune.allocation=rescope"]),
                              str(tmp_path / "r"), progress=False).mask
    assert rescope.kept() == fixed.kept()


def test_ticket_weights_init_keeps_theta0_on_the_searched_mask(tmp_path):
    cfg = load_config("digits_pgdat", TINY + ["prune.method=awt", "prune.density=0.1", "prune.ticket_weights=init"])
    ticket = prune_to_folder(cfg, str(tmp_path / "t"), progress=False)
    torch.manual_seed(cfg.train.seed)
    theta0 = rs.build_model("cnn", 1, 10, (8, 8), width=8).state_dict()
    for name, m in ticket.mask.items():
        assert torch.equal(ticket.state[name], theta0[name] * m)


def test_conv_bn_pairs_are_the_convs_that_feed_only_a_batch_norm():
    from robustsparse.prune.rescale import conv_bn_pairs
    cnn = rs.build_model("cnn", 1, 10, (8, 8), width=8)
    assert conv_bn_pairs(cnn) == {f"net.features.{i}.weight": f"net.features.{i + 1}" for i in (0, 3, 7)}
    wrn = rs.build_model("wrn-16-4", 3, 10, (32, 32))
    pairs = conv_bn_pairs(wrn)
    assert "net.block1.0.conv1.weight" in pairs  # conv1 -> bn2 inside a pre-activation block
    assert "net.block1.0.conv2.weight" not in pairs  # conv2's output is added to the shortcut: not invariant


def test_restore_filter_norms_gives_back_theta0_norms_and_keeps_the_training_mode_function():
    from robustsparse.prune.rescale import conv_bn_pairs, restore_filter_norms
    torch.manual_seed(0)
    model = rs.build_model("cnn", 1, 10, (8, 8), width=8).train()
    theta0 = {n: q.detach().clone() for n, q in model.named_parameters()}
    mask = {n: (torch.rand_like(q) < 0.5).float() for n, q in theta0.items() if q.dim() > 1}
    searched = {n: q * (1 + torch.rand(q.shape[0], *([1] * (q.dim() - 1)))) * 3 for n, q in theta0.items()}
    pairs = conv_bn_pairs(model)
    restored = restore_filter_norms(searched, theta0, mask, pairs)
    x = torch.rand(16, 1, 8, 8)

    def run(params):
        return torch.func.functional_call(model, {n: q * mask[n] if n in mask else q for n, q in params.items()},
                                          (x,))
    for name in pairs:
        got = (restored[name] * mask[name]).flatten(1).norm(dim=1)
        want = (theta0[name] * mask[name]).flatten(1).norm(dim=1)
        assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(run(restored), run(searched), rtol=1e-3, atol=1e-2)  # train-mode BN cancels the scale
    unpaired = [n for n in searched if n not in pairs]
    assert unpaired and all(torch.equal(restored[n], searched[n]) for n in unpaired)  # linear layers: untouched


def test_a_rescaled_search_keeps_mask_and_directions_and_restores_filter_norms(tmp_path):
    base = TINY + ["prune.method=awt", "prune.density=0.1", "prune.mask_update_every=100"]
    plain = prune_to_folder(load_config("digits_pgdat", base), str(tmp_path / "p"), progress=False)
    rescaled = prune_to_folder(load_config("digits_pgdat", base + ["prune.rescale=filter"]), str(tmp_path / "r"),
                               progress=False)
    assert rescaled.info["rescale"] == "filter"
    torch.manual_seed(0)
    theta0 = rs.build_model("cnn", 1, 10, (8, 8), width=8).state_dict()
    for name, m in plain.mask.items():
        assert torch.equal(rescaled.mask[name], m)
        a, b = plain.state[name].flatten(1), rescaled.state[name].flatten(1)
        if name.startswith("net.features."):  # a conv feeding a BN: same direction, θ₀'s norm
            assert torch.allclose(b.norm(dim=1), (theta0[name] * m).flatten(1).norm(dim=1), rtol=1e-5)
            assert torch.allclose(torch.nn.functional.cosine_similarity(a, b, dim=1)[a.norm(dim=1) > 0],
                                  torch.ones(1), atol=1e-5)
            assert not torch.allclose(a.norm(dim=1), b.norm(dim=1), rtol=1e-3)  # the search did change them
        else:
            assert torch.equal(a, b)


def test_restore_dense_scale_gives_unnormalised_rows_their_dense_norm_and_bn_fed_filters_their_share():
    from robustsparse.prune.rescale import conv_bn_pairs, restore_dense_scale
    torch.manual_seed(0)
    model = rs.build_model("cnn", 1, 10, (8, 8), width=8)
    theta0 = {n: q.detach().clone() for n, q in model.named_parameters()}
    mask = {n: (torch.rand_like(q) < 0.3).float() for n, q in theta0.items() if q.dim() > 1}
    pairs = conv_bn_pairs(model)
    out = restore_dense_scale(theta0, theta0, mask, pairs)
    for name, m in mask.items():
        rows = (out[name] * m).flatten(1).norm(dim=1)
        dense = theta0[name].flatten(1).norm(dim=1)
        kept = m.flatten(1).mean(1)
        want = dense * kept.sqrt() if name in pairs else dense
        assert torch.allclose(rows[kept > 0], want[kept > 0], rtol=1e-5), name
    assert set(pairs) < set(mask)  # both rules were exercised


def test_a_dense_scale_ticket_has_a_kernel_nearer_dense_magnitude_under_batch_statistics(tmp_path):
    """Masking shrinks the kernel that batch-statistics BN training sees (about 13x at density 0.1 on digits);
    rescale=dense gives much of it back. Same mask, same search."""
    import copy
    from robustsparse.analysis.ntk import empirical_ntk
    from robustsparse.models.bn import calibrate_bn
    from robustsparse.sparse import load_model_state
    base = TINY + ["prune.method=awt", "prune.density=0.1", "prune.mask_update_every=100"]
    plain = prune_to_folder(load_config("digits_pgdat", base), str(tmp_path / "p"), progress=False)
    scaled = prune_to_folder(load_config("digits_pgdat", base + ["prune.rescale=dense"]), str(tmp_path / "d"),
                             progress=False)
    assert all(torch.equal(plain.mask[n], scaled.mask[n]) for n in plain.mask.keys())
    x, _ = rs.load_dataset("digits", split="train")
    torch.manual_seed(0)
    dense = rs.build_model("cnn", 1, 10, (8, 8), width=8)
    calibrate_bn(dense, None, x[:64])
    probe = x[100:108]
    k_dense = empirical_ntk(dense, probe).norm()

    def magnitude(ticket):
        sparse = copy.deepcopy(dense)
        load_model_state(sparse, ticket.state)
        calibrate_bn(sparse, None, x[:64])
        return float(empirical_ntk(sparse, probe).norm() / k_dense)

    before, after = magnitude(plain), magnitude(scaled)  # measured: 0.08 and 0.52
    assert before < 0.25 and 4 * before < after < 2


def test_awt_search_killed_mid_way_resumes_to_the_same_ticket(tmp_path):
    import subprocess
    import sys
    args = ["prune", "digits_pgdat", *TINY, "prune.search_iters=9", "prune.checkpoint_every=2", "--method", "awt",
            "--density", "0.1", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda a, extra=None: subprocess.run([sys.executable, "-m", "robustsparse", *a],  # noqa: E731
                                               env={**env, **(extra or {})}, capture_output=True, text=True,
                                               timeout=300)
    ref = run(args + [str(tmp_path / "ref")])
    assert ref.returncode == 0 and "SynFlow rounds" in ref.stderr  # AWT's starting mask
    assert "awt search" in ref.stderr  # the search's progress bar, which --no-progress turns off below
    dead = run(args + [str(tmp_path / "k")], {"ROBUSTSPARSE_KILL_AT_STEP": "5"})
    assert dead.returncode == -9, dead.stderr
    assert os.path.exists(tmp_path / "k" / "search-state" / "search.json")
    resumed = run(["prune", "--resume", "--out", str(tmp_path / "k"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert "awt search" not in resumed.stderr
    assert "SynFlow rounds" not in resumed.stderr  # the saved mask is the start; the scorer is not run again
    (a, _), (b, _) = load_ticket(str(tmp_path / "ref")), load_ticket(str(tmp_path / "k"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(tmp_path / "k" / "search-state")  # cleaned up once the ticket is written
    assert main(["prune", "--resume", "--out", str(tmp_path / "nothing")]) == 2


def test_prune_cli_and_refusals(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["prune", "digits_pgdat", *TINY, "--method", "magnitude", "--density", "0.2", "--out",
                 str(out)]) == 0
    assert "density 0.2000" in capsys.readouterr().out
    assert main(["prune", "digits_pgdat", "--method", "magnitude", "--out", str(out)]) == 2  # never overwrite
    assert main(["prune", "digits_pgdat", "--method", "nope", "--out", str(tmp_path / "u")]) == 2
    assert main(["prune", "digits_pgdat", "--density", "0", "--out", str(tmp_path / "u")]) == 2
    assert "density" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "u")


def _batch_bn_distance_by_hand(ticket_dir: str) -> float:
    """‖Θ_ticket − Θ_dense‖_F / ‖Θ_dense‖_F from explicit Jacobians on compare's probe, each network's BN set to
    the batch statistics of the first prune.bn_samples training images (written out here, not calibrate_bn)."""
    import copy
    from torch.func import functional_call, jacrev, vmap
    from robustsparse.analysis.dynamics import make_probe
    from robustsparse.sparse import load_model_state
    from robustsparse.data import load_split
    from robustsparse.train.spec import build_from_spec, model_spec
    cfg = load_config("digits_pgdat", TINY)
    torch.manual_seed(cfg.train.seed)
    dense = build_from_spec(model_spec(cfg)).eval()
    probe = make_probe(cfg, dense)
    sparse = copy.deepcopy(dense)
    load_model_state(sparse, load_ticket(ticket_dir)[0])
    x_bn = load_split(cfg, "train")[0][: cfg.prune.bn_samples]

    def kernel(model):
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        inputs = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0])) for m in bns]
        with torch.no_grad():
            model(x_bn)  # eval mode: each BN's input is computed with the statistics already set upstream ...
            for bn in bns:  # ... so set them one layer at a time, in forward order, and run again
                bn.running_mean.copy_(inputs[bn].mean((0, 2, 3)))
                bn.running_var.copy_(inputs[bn].var((0, 2, 3), unbiased=True))
                model(x_bn)
        for h in hooks:
            h.remove()
        params = {k: v.detach() for k, v in model.named_parameters()}
        jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), in_dims=(None, 0))(params, probe)
        masks = {k[: -len("_mask")]: b for k, b in model.named_buffers() if k.endswith("weight_mask")}
        # the sparse network's J diag(m): a pruned weight is not trainable, so its column is dropped
        j = torch.cat([(t * masks[k] if k in masks else t).flatten(2) for k, t in jac.items()], dim=2)  # [n, K, P]
        return torch.einsum("ikp,jlp->ijkl", j, j)

    k_dense, k_sparse = kernel(dense), kernel(sparse)
    return float((k_sparse - k_dense).norm() / k_dense.norm())


def test_compare_grid_writes_table_and_plot_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "grid")
    args = ["compare", "digits_pgdat", *TINY, "--methods", "magnitude,awt", "--densities", "0.2",
            "--suite", "clean,pgd-3", "--out", out, "--no-progress", "--dynamics"]
    assert main(args) == 0
    rows = json.load(open(os.path.join(out, "results.json")))
    assert [r["method"] for r in rows] == ["dense", "magnitude", "awt"]
    for r in rows:
        assert r["accuracy"]["pgd-3"] <= r["accuracy"]["clean"]
        assert "PGD-3" in r["attacks"]["pgd-3"]
    assert rows[1]["nonzero_params"] < rows[0]["nonzero_params"]
    assert rows[0]["ntk_distance_at_init"] == 0.0 and rows[1]["ntk_distance_at_init"] > 0
    assert rows[0]["ntk_distance_at_init_batch_bn"] == 0.0 and rows[1]["ntk_distance_at_init_batch_bn"] > 0
    assert rows[1]["ntk_distance_at_init_batch_bn"] != rows[1]["ntk_distance_at_init"]  # another network
    # rel 1e-4: vmap'd kernel blocks vs jacrev, float32 sums in another order, no sign()/argmax in between; the
    # distance (~1) is a ratio of norms, so the error stays at float32 rounding (measured 1.3e-6 with AVX2 kernels)
    assert rows[1]["ntk_distance_at_init_batch_bn"] == pytest.approx(
        _batch_bn_distance_by_hand(os.path.join(out, "magnitude-d0.2", "ticket")), rel=1e-4)
    assert os.path.exists(os.path.join(out, "density_robustness.png"))
    table = open(os.path.join(out, "results.md")).read()
    assert "BN at init stats" in table and "BN batch stats" in table and "awt" in table
    share = rows[2]["prune_seconds"] / rows[2]["train_seconds"]
    assert f"- awt at density 0.2: search {rows[2]['prune_seconds']:.1f} s = {share:.1%} of its adversarial" in table
    assert "- magnitude at density" not in table  # only searched tickets have a search cost line
    from robustsparse.analysis.dynamics import dynamics_distances
    dyn = dynamics_distances(os.path.join(out, "awt-d0.2", "run"), os.path.join(out, "dense"))
    assert [r["epoch"] for r in dyn] == [0, 1, 2]  # initialisation and every epoch
    assert all(r["ntk_distance"] > 0 and r["output_distance"] > 0 for r in dyn)
    assert dyn[0]["ntk_distance"] == pytest.approx(rows[2]["ntk_distance_at_init"], rel=1e-4)
    assert os.path.exists(os.path.join(out, "dynamics.png"))
    before = os.path.getmtime(os.path.join(out, "awt-d0.2", "run", "eval.json"))
    assert main(args) == 0  # a finished grid is not recomputed
    assert os.path.getmtime(os.path.join(out, "awt-d0.2", "run", "eval.json")) == before


def test_the_density_plot_of_a_suite_without_attacks_shows_clean_accuracy(tmp_path):
    import matplotlib.image
    from robustsparse.runs.plots import plot_density_robustness
    rows = [{"method": "dense", "density": 1.0, "accuracy": {"clean": 0.99}, "attacks": {"clean": "clean"}},
            {"method": "snip", "density": 0.1, "accuracy": {"clean": 0.97}, "attacks": {"clean": "clean"}},
            {"method": "snip", "density": 0.05, "accuracy": {"clean": 0.95}, "attacks": {"clean": "clean"}}]
    path = plot_density_robustness(rows, str(tmp_path / "plot.png"))  # `compare --suite clean` crashed here
    assert matplotlib.image.imread(path).shape[0] > 100


def test_compare_over_seeds_reports_mean_and_std_of_the_per_seed_grids(tmp_path, capsys):
    out = str(tmp_path / "grid")
    args = ["compare", "digits_pgdat", *TINY, "train.epochs=1", "--methods", "magnitude", "--densities", "0.2",
            "--suite", "clean,pgd-3", "--out", out, "--no-progress", "--seeds", "0,1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[compare] seed 1" in err and "img/s" not in err  # --no-progress silences the evaluations' bars too
    per_seed = [json.load(open(os.path.join(out, f"seed{s}", "results.json"))) for s in (0, 1)]
    assert load_config(os.path.join(out, "seed1", "dense", "config.yaml")).train.seed == 1
    summary = json.load(open(os.path.join(out, "results.json")))
    assert summary["seeds"] == [0, 1] and [r["method"] for r in summary["rows"]] == ["dense", "magnitude"]
    for i, row in enumerate(summary["rows"]):
        values = [grid[i]["accuracy"]["pgd-3"] for grid in per_seed]
        assert row["per_seed_accuracy"]["pgd-3"] == values
        assert row["accuracy"]["pgd-3"] == pytest.approx(sum(values) / 2)
        assert row["accuracy_std"]["pgd-3"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        distances = [grid[i]["ntk_distance_at_init_batch_bn"] for grid in per_seed]
        assert row["ntk_distance_at_init_batch_bn"] == pytest.approx(sum(distances) / 2)
    assert per_seed[0][0]["nonzero_params"] == per_seed[1][0]["nonzero_params"]
    table = open(os.path.join(out, "results.md")).read()
    assert "over 2 seeds (0, 1)" in table and "±" in table and "PGD-3" in table
    assert main(args[:-2] + ["--seeds", "0,0"]) == 2
    assert "distinct" in capsys.readouterr().err

    # a finished grid copied without its weights (what a results folder keeps) still pools: every cell's row is
    # read back from its row.json, nothing is retrained, re-pruned or re-attacked
    for folder, _, files in os.walk(out):
        for name in files:
            if name.endswith(".safetensors"):
                os.remove(os.path.join(folder, name))
    assert main(args) == 0
    assert json.load(open(os.path.join(out, "results.json")))["rows"] == summary["rows"]
    assert not any(n.endswith(".safetensors") for _, _, files in os.walk(out) for n in files)


def test_a_search_started_from_synflow_shows_no_progress_bar_when_asked_not_to(tmp_path, capfd):
    cfg = load_config("digits_pgdat", TINY + ["prune.method=awt", "prune.density=0.1"])
    prune_to_folder(cfg, str(tmp_path / "quiet"), progress=False)
    assert "SynFlow" not in capfd.readouterr().err
    prune_to_folder(cfg, str(tmp_path / "loud"), progress=True)
    assert "SynFlow rounds" in capfd.readouterr().err


def test_a_prune_killed_while_writing_its_config_can_be_started_again(tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    (out / "config.yaml.tmp").write_text("method: magn")  # the kill landed inside the atomic write
    assert main(["prune", "digits_pgdat", *TINY, "--method", "magnitude", "--density", "0.2", "--out", str(out)]) == 0
    assert not (out / "config.yaml.tmp").exists() and (out / "ticket.json").exists()
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "other.txt").write_text("x")  # anything else is still refused
    assert main(["prune", "digits_pgdat", "--method", "magnitude", "--out", str(tmp_path / "u")]) == 2
