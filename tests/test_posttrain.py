"""After-training pruning: HYDRA (scores, STE, frozen weights, exact resume), LWM, adversarial IMP, the CLI."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

import robustsparse as rs
from robustsparse.cli import main
from robustsparse.config import load_config
from robustsparse.posttrain import posttrain
from robustsparse.posttrain.hydra import ScoredNetwork, freeze_for_scoring, scaled_scores, score_stage
from robustsparse.posttrain.imp import imp_schedule, next_mask
from robustsparse.sparse.ticket import load_ticket
from robustsparse.runs.checkpoint import load_checkpoint
from robustsparse.sparse import Mask, masks_from_scores, prunable_parameters
from robustsparse.train import train

TINY = ["model.options={width: 8}", "attack.steps=2", "train.epochs=2", "train.val_attack_steps=2",
        "train.batch_size=128", "prune.hydra_epochs=2", "prune.finetune_epochs=1", "prune.imp_epochs=1",
        "prune.imp_eval_suite=clean,pgd-2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A finished tiny dense PGD-AT run that also keeps its epoch-1 checkpoint (an IMP rewinding point)."""
    out = str(tmp_path_factory.mktemp("pre") / "dense")
    train(load_config("digits_pgdat", TINY + ["train.keep_epochs=[1]"]), out, progress=False)
    return out


def _weights(run):
    return {k: v.detach().clone() for k, v in prunable_parameters(rs.load(run)).items()}


def test_straight_through_gradient_is_sign_s_times_w_times_grad_w_eff():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    freeze_for_scoring(net, freeze_bn=False)
    scores = {n: torch.randn_like(w) for n, w in prunable_parameters(net).items()}  # both signs
    scored = ScoredNetwork(net, scores, density=0.5, scope="layer")
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    nn.functional.cross_entropy(scored(x), y).backward()
    weights = prunable_parameters(net)
    w_eff = {n: (w * scored.mask[n]).detach().requires_grad_(True) for n, w in weights.items()}
    nn.functional.cross_entropy(functional_call(net, w_eff, (x,)), y).backward()
    for (name, s) in scored.score_dict().items():
        expected = torch.sign(scores[name]) * weights[name] * w_eff[name].grad
        assert torch.allclose(s.grad, expected, atol=1e-7), name
        assert s.grad[scored.mask[name] == 0].abs().sum() > 0, "pruned weights must get a gradient too"
        assert weights[name].grad is None, "weights are frozen"
    with torch.no_grad():  # the forward is the masked network
        assert torch.allclose(scored(x), functional_call(net, w_eff, (x,)))


def test_scaled_score_init_is_sqrt6_over_fan_in_times_w_over_max_abs_w():
    torch.manual_seed(1)
    model = rs.build_model("cnn", 1, 10, (8, 8), width=8)
    scores = scaled_scores(model)
    for name, w in prunable_parameters(model).items():
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(w)
        expected = math.sqrt(6.0 / fan_in) * w.detach() / w.detach().abs().max()
        assert torch.allclose(scores[name], expected, rtol=1e-6), name
        assert scores[name].abs().max().item() == pytest.approx(math.sqrt(6.0 / fan_in), rel=1e-6)


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_score_stage_freezes_weights_and_keeps_exact_per_layer_density(tmp_path, pretrained, freeze_bn):
    cfg = load_config("digits_pgdat", TINY + ["prune.method=hydra", "prune.density=0.1", "prune.hydra_epochs=1",
                                              f"prune.freeze_bn={freeze_bn}"])
    net = rs.load(pretrained)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    mask, state, cost = score_stage(cfg, net, str(tmp_path / "scores"), progress=False)
    params = dict(net.named_parameters())
    prunable = prunable_parameters(net)
    frozen = set(prunable) | {k[:-len("weight")] + "bias" for k in prunable} & set(params)
    assert len(frozen) > len(prunable), "the cnn's linear layers have biases"
    for key in frozen:
        assert torch.equal(state[key], before[key]), f"{key}: weights and biases must be frozen"
    bn_keys = [k for k in params if k not in frozen]
    assert bn_keys, "the cnn has BN parameters"
    changed = [not torch.equal(state[k], before[k]) for k in bn_keys]
    assert (not any(changed)) if freeze_bn else all(changed)
    # HYDRA's per-layer top-k with its count n - int((1 - k) n) (prune.keep_count=reference, the default since
    # issue 19; round(k n) before), guard: >= ceil(0.01 n), >= 1
    for name, m in mask.items():
        n = m.numel()
        assert int(m.sum()) == max(n - int(0.9 * n), math.ceil(0.01 * n), 1), name
    assert cost["epochs"] == 1 and cost["seconds"] > 0
    assert torch.equal(Mask.load(str(tmp_path / "scores" / "mask.safetensors"))[name], m)
    rows = rs.runs.logger.read_metrics(str(tmp_path / "scores"))
    assert len(rows) == 1 and "PGD-2" in rows[0]["val_attack"] and 0 < rows[0]["mask_kept_from_lwm"] <= 1


def test_hydra_killed_in_the_score_stage_resumes_to_the_same_mask(tmp_path, pretrained):
    args = ["digits_pgdat", *TINY, "train.checkpoint_every_steps=2", "--method", "hydra", "--density", "0.1",
            "--pretrained", pretrained, "--suite", "none", "--no-progress"]
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    env = {**os.environ, "ROBUSTSPARSE_KILL_AT_STEP": "13", "OMP_NUM_THREADS": "1"}  # epoch 2 of 9-step epochs
    dead = subprocess.run([sys.executable, "-m", "robustsparse", "posttrain", *args, "--out", killed], env=env,
                          capture_output=True, text=True, timeout=300)
    assert dead.returncode == -9, dead.stderr  # really SIGKILLed, mid score stage
    assert not os.path.exists(os.path.join(killed, "scores", "mask.safetensors"))
    assert load_checkpoint(os.path.join(killed, "scores", "checkpoints", "last.json"))[1]["step"] > 0
    # The killed run's first steps ran in a one-thread subprocess, the resume and the reference run here: bit for
    # bit needs the same float reduction order, so the same thread count here too (whatever OMP_NUM_THREADS the
    # test session was started with: under OMP_NUM_THREADS=2 the scores and momentum differed in the last bits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["posttrain", "--resume", "--out", killed, "--no-progress"]) == 0
        assert main(["posttrain", *args, "--out", ref]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = (load_file(os.path.join(d, "scores", "mask.safetensors")) for d in (ref, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (sa, _), (sb, _) = (load_checkpoint(os.path.join(d, "scores", "checkpoints", "last.json")) for d in (ref, killed))
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "scores, BN and momentum bit for bit"
    fa, fb = _weights(os.path.join(ref, "finetune")), _weights(os.path.join(killed, "finetune"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    pre = _weights(pretrained)
    ticket, _ = load_ticket(os.path.join(ref, "ticket"))
    for name, w in pre.items():  # the fine-tune starts from the pre-trained weights under the learned mask
        assert torch.equal(ticket[name], w * ticket[name + "_mask"])


def test_lwm_is_per_layer_magnitude_of_the_pretrained_weights(tmp_path, pretrained):
    cfg = load_config("digits_pgdat", TINY)
    result = posttrain(cfg, str(tmp_path / "lwm"), method="lwm", density=0.1, pretrained=pretrained,
                       suite="clean,pgd-2", progress=False)
    pre = _weights(pretrained)
    expected = masks_from_scores({k: w.abs() for k, w in pre.items()}, 0.1, "layer", 0.01)
    ticket, _ = load_ticket(str(tmp_path / "lwm" / "ticket"))
    for name, w in pre.items():
        assert torch.equal(ticket[name + "_mask"], expected[name]), name
        assert torch.equal(ticket[name], w * expected[name])
    hydra_start = ScoredNetwork(rs.load(pretrained), scaled_scores(rs.load(pretrained)), 0.1, "layer", 0.01).mask
    assert all(torch.equal(hydra_start[k], expected[k]) for k in expected), "HYDRA starts from LWM"
    (outcome,) = result.outcomes
    assert [s["epochs"] for s in outcome.stages] == [2, 0, 1]  # reused pre-training + prune + fine-tune
    assert not os.path.exists(tmp_path / "lwm" / "pretrain"), "--pretrained is reused, not retrained"
    assert "PGD-2" in result.evals[0.1]["attacks"]["pgd-2"]
    assert rs.runs.checkpoint.read_meta(os.path.join(pretrained, "checkpoints", "best.json"))  # untouched


def test_imp_schedule_lands_exactly_on_each_requested_density():
    rounds = imp_schedule([0.1], 0.2)
    assert len(rounds) == 11 and rounds[-1] == (0.1, True) and not any(r for _, r in rounds[:-1])
    assert all(d == pytest.approx(0.8 ** (i + 1)) for i, (d, _) in enumerate(rounds[:-1]))
    assert [d for d, r in imp_schedule([0.3, 0.1], 0.5) if r] == [0.3, 0.1]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_next_mask_is_nested_and_exact(scope):
    torch.manual_seed(2)
    weights = {"a.weight": torch.randn(30, 20), "b.weight": torch.randn(10, 30)}
    previous = masks_from_scores({k: torch.rand_like(w) for k, w in weights.items()}, 0.5, scope)
    mask = next_mask(weights, previous, 0.2, scope)
    assert mask.is_nested_in(previous) and not previous.is_nested_in(mask)
    if scope == "global":
        assert mask.kept() == round(0.2 * mask.total())
    else:
        assert all(int(m.sum()) == round(0.2 * m.numel()) for m in mask.state().values())


def test_imp_rounds_are_nested_exact_and_rewound_to_epoch_k(tmp_path, pretrained):
    cfg = load_config("digits_pgdat", TINY + ["prune.imp_rate=0.5", "prune.imp_rewind_epoch=1"])
    out = tmp_path / "imp"
    result = posttrain(cfg, str(out), method="imp", density=[0.3, 0.1], pretrained=pretrained, suite="none",
                       progress=False)
    rows = [json.loads(line) for line in open(out / "rounds.jsonl")]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert [r["density_target"] for r in rows] == [0.5, 0.3, 0.15, 0.1]
    rewind, _ = load_checkpoint(os.path.join(pretrained, "checkpoints", "epoch-1.json"))
    previous = None
    for r in rows:
        ticket, meta = load_ticket(str(out / f"round-{r['round']}" / "ticket"))
        mask = Mask({k[:-5]: v for k, v in ticket.items() if k.endswith("_mask")})
        assert mask.kept() == round(r["density_target"] * mask.total()) == r["kept"]  # global scope: exact
        if previous is not None:
            assert mask.is_nested_in(previous) and r["nested_in_previous"]
        for key, value in ticket.items():  # rewound: epoch-1 weights (and BN) under the round's mask
            if key.endswith("_mask"):
                continue
            expected = rewind["model." + key] * (ticket[key + "_mask"] if key + "_mask" in ticket else 1)
            assert torch.equal(value, expected), key
        assert "PGD-2" in r["attacks"]["pgd-2"] and 0 <= r["accuracy"]["pgd-2"] <= r["accuracy"]["clean"]
        previous = mask
    assert [o.density for o in result.outcomes] == [0.3, 0.1]
    assert [s["stage"] for s in result.outcomes[1].stages][-1] == "IMP round 4"
    assert rs.sparse.get_mask(rs.load(result.outcomes[1].run_dir)).density() == pytest.approx(0.1, abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--method", "nope", "--density", "0.1"], "unknown after-training method"),
    (["--method", "hydra", "--density", "1.5"], "--density"),
    (["--method", "hydra", "--density", "x"], "--density"),
    (["--method", "lwm", "--density", "0.1,0.05"], "one density"),
    (["--method", "hydra", "--density", "0.1", "--pretrained", "/nonexistent/run"], "--pretrained"),
    (["--method", "imp", "--density", "0.1", "prune.imp_rewind_epoch=1", "--pretrained", "PRE"], "epoch 1"),
    (["--method", "hydra", "--density", "0.1", "prune.hydra_objective=mart"], "hydra_objective"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, pretrained, args, message):
    out = str(tmp_path / "out")
    if "PRE" in args:  # a finished dense run without the epoch-1 checkpoint IMP would rewind to
        bare = str(tmp_path / "bare")
        shutil.copytree(pretrained, bare, ignore=shutil.ignore_patterns("epoch-*"))
        args = [bare if a == "PRE" else a for a in args]
    assert main(["posttrain", "digits_pgdat", *TINY, *args, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("robustsparse: error:"), err
    assert not os.path.exists(out)


def test_cli_resume_of_an_empty_folder_and_a_changed_request_are_refused(tmp_path, capsys, pretrained):
    assert main(["posttrain", "--resume", "--out", str(tmp_path / "none")]) == 2
    out = str(tmp_path / "lwm")
    base = ["posttrain", "digits_pgdat", *TINY, "--method", "lwm", "--density", "0.2", "--pretrained", pretrained,
            "--suite", "none", "--no-progress", "--out", out]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base[:-2] + ["prune.finetune_lr=0.02", "--out", out]) == 2
    assert "another method, density" in capsys.readouterr().err
    assert main(base) == 0  # the same request continues (nothing left to do)


def test_a_start_killed_while_writing_its_first_file_can_be_started_again(tmp_path, pretrained):
    """A kill inside the atomic write of posttrain.yaml / config.yaml leaves only its .tmp: no work, so a new start
    takes the folder (and --resume, which has nothing to read, refuses it); anything else is still refused."""
    lwm = tmp_path / "lwm"
    lwm.mkdir()
    (lwm / "posttrain.yaml.tmp").write_text("method: lw")
    assert main(["posttrain", "--resume", "--out", str(lwm)]) == 2
    assert main(["posttrain", "digits_pgdat", *TINY, "--method", "lwm", "--density", "0.2", "--pretrained",
                 pretrained, "--suite", "none", "--no-progress", "--out", str(lwm)]) == 0
    assert (lwm / "posttrain.yaml").exists() and not (lwm / "posttrain.yaml.tmp").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml.tmp").write_text("data: {na")
    assert main(["train", "digits_pgdat", *TINY, "train.epochs=1", "--out", str(run), "--no-progress"]) == 0
    from robustsparse.train.stages import is_finished
    assert is_finished(str(run))
    assert not (run / "config.yaml.tmp").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.yaml.tmp").write_text("x")
    (taken / "notes.txt").write_text("mine")
    assert main(["train", "digits_pgdat", *TINY, "--out", str(taken), "--no-progress"]) == 2
    assert main(["posttrain", "digits_pgdat", *TINY, "--method", "lwm", "--density", "0.2", "--pretrained",
                 pretrained, "--suite", "none", "--no-progress", "--out", str(taken)]) == 2


def test_compare_puts_after_training_methods_in_the_grid_with_total_cost(tmp_path, pretrained):
    from robustsparse.pipelines.compare import run_compare
    out = tmp_path / "grid"
    shutil.copytree(pretrained, out / "dense")  # the grid's dense cell, already trained: it must not be retrained
    cfg = load_config("digits_pgdat", TINY + ["prune.imp_rate=0.5"])
    rows = run_compare(cfg, ["magnitude", "hydra", "lwm", "imp"], [0.3], str(out), suite="clean,pgd-2",
                       progress=False)
    assert [r["method"] for r in rows] == ["dense", "magnitude", "hydra", "lwm", "imp"]
    assert not os.path.exists(out / "dense" / "train_seconds.json"), "the dense cell was not retrained"
    cost = {r["method"]: r["cost"] for r in rows}
    assert cost["dense"]["epochs"] == 2 and cost["magnitude"]["epochs"] == 2
    assert cost["hydra"]["epochs"] == 2 + 2 + 1 and cost["lwm"]["epochs"] == 2 + 0 + 1
    assert cost["imp"]["epochs"] == 2 + 1 + 1  # rounds at densities 0.5 and 0.3
    for r in rows[2:]:
        assert cost[r["method"]]["stages"][0]["seconds"] == cost["dense"]["seconds"]  # the dense cell's own time
        assert r["ntk_distance_at_init"] is None and "PGD-2" in r["attacks"]["pgd-2"]
        assert r["nonzero_params"] < rows[0]["nonzero_params"]
    for cell in ("hydra-d0.3", "lwm-d0.3", "imp"):
        request = yaml.safe_load(open(out / cell / "posttrain.yaml"))
        assert request["pretrained"]["path"] == os.path.abspath(out / "dense")
        assert not os.path.exists(out / cell / "pretrain")
    table = open(out / "results.md").read()
    assert "training epochs (total)" in table and "| 2+2+1 = 5 |" in table and "n/a" in table
    assert os.path.exists(out / "density_robustness.png")
