"""prune.preset: the short and faithful settings of the NTT/AWT search, how they resolve, what the faithful one does
to the mask, and what a ticket records (the settings and the search's cost)."""
import copy

import pytest
import torch

from robustsparse.config import load_config
from robustsparse.errors import UserError
from robustsparse.pipelines.ticket import prune_to_folder
from robustsparse.prune.presets import PRESET_KEYS, PRESETS, mask_update_iterations, search_settings

TINY = ["model.options={width: 8}", "attack.steps=2", "train.epochs=2", "train.val_attack_steps=2",
        "train.batch_size=128", "prune.synflow_rounds=5", "prune.density=0.1"]
# Today's (pre-preset) defaults, written out: the short preset must be exactly these
TODAY = {"awt": ["prune.search_iters=20", "prune.search_batch=4", "prune.search_lr=5e-3", "prune.ntk_weight=0.1",
                 "prune.allocation=fixed", "prune.scope=global", "prune.init_method=synflow"],
         "ntt": ["prune.search_iters=20", "prune.search_batch=4", "prune.search_lr=5e-3", "prune.ntk_weight=0.1",
                 "prune.allocation=fixed", "prune.scope=layer", "prune.init_method=magnitude"]}
# The faithful preset at a test's size: 10 updates every 2 steps instead of every 100
FAITHFUL_SMALL = ["prune.preset=faithful", "prune.search_iters=22", "prune.mask_update_every=2",
                  "prune.search_batch=8"]


def _same_ticket(a, b) -> bool:
    return a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_an_unknown_preset_is_one_line_naming_the_valid_ones():
    with pytest.raises(UserError) as info:
        load_config("digits_pgdat", ["prune.preset=longer"])
    message = str(info.value)
    assert "\n" not in message and "prune.preset" in message and "short" in message and "faithful" in message


@pytest.mark.parametrize("method", ["awt", "ntt"])
def test_the_faithful_preset_resolves_to_the_method_as_specified(method):
    s = search_settings(load_config("digits_pgdat", [f"prune.method={method}", "prune.preset=faithful"]))
    assert (s["scope"], s["init_method"], s["allocation"]) == ("layer", "magnitude", "rescope")  # LayerwiseMagnitude
    assert (s["search_batch"], s["search_lr"], s["ntk_weight"], s["l2_weight"], s["output_weight"]) == \
        (64, 5e-4, 1e-3, 1e-5, 1.0)  # NTT's settings
    assert s["ntk_mode"] == "full" and s["mode"] == "weights" and s["mask_update_every"] == 100
    assert s["search_iters"] >= 1000
    assert len(mask_update_iterations(s["search_iters"], s["mask_update_every"])) >= 10


def test_explicit_keys_override_the_preset_and_the_method_is_read_when_the_search_runs():
    cfg = load_config("digits_pgdat", ["prune.method=awt", "prune.preset=faithful", "prune.search_iters=300",
                                       "prune.init_method=synflow"])
    s = search_settings(cfg)
    assert s["search_iters"] == 300 and s["init_method"] == "synflow"  # explicit
    assert s["search_batch"] == 64 and s["scope"] == "layer"  # still the preset's
    short = load_config("digits_pgdat", ["prune.method=awt"])
    assert search_settings(short)["init_method"] == "synflow" and search_settings(short)["scope"] == "global"
    cell = copy.deepcopy(short)
    cell.prune.method = "ntt"  # as compare sets it per cell, after loading
    assert search_settings(cell)["scope"] == "layer" and search_settings(cell)["init_method"] == "magnitude"
    assert all(search_settings(short)[k] == PRESETS["short"]["awt"][k] for k in PRESET_KEYS)


@pytest.mark.parametrize("method", ["awt", "ntt"])
def test_the_short_preset_is_the_search_as_it_was_before_presets(tmp_path, method):
    """The default (short) equals today's settings written out, bit for bit, and its mask never moves: it is the
    starting scorer's (AWT: SynFlow, global; NTT: magnitude, layer-wise)."""
    base = TINY + [f"prune.method={method}"]
    default = prune_to_folder(load_config("digits_pgdat", base), str(tmp_path / "d"), progress=False)
    spelled = prune_to_folder(load_config("digits_pgdat", base + TODAY[method]), str(tmp_path / "t"),
                              progress=False)
    assert _same_ticket(default, spelled)
    assert default.info["preset"] == "short" and default.info["mask_updates"] == []
    start = "synflow" if method == "awt" else "magnitude"
    scorer = prune_to_folder(load_config("digits_pgdat", TINY + [f"prune.method={start}",
                                                                 f"prune.scope={default.info['scope']}"]),
                             str(tmp_path / "s"), progress=False)
    assert all(torch.equal(default.mask[n], scorer.mask[n]) for n in scorer.mask.keys())


def test_the_faithful_search_recomputes_the_layerwise_mask_ten_times_and_it_moves(tmp_path):
    cfg = load_config("digits_pgdat", TINY + ["prune.method=awt"] + FAITHFUL_SMALL)
    ticket = prune_to_folder(cfg, str(tmp_path / "f"), progress=False)
    start = prune_to_folder(load_config("digits_pgdat", TINY + ["prune.method=magnitude", "prune.scope=layer"]),
                            str(tmp_path / "m"), progress=False).mask
    updates = ticket.info["mask_updates"]
    assert [u["iter"] for u in updates] == list(range(2, 22, 2))  # 10 updates, none after the last step
    assert all(u["changed"] > 0 for u in updates), updates  # every update swapped some kept weights
    assert all(u["density"] == pytest.approx(0.1, abs=1e-3) for u in updates)
    assert any(not torch.equal(ticket.mask[n], start[n]) for n in start.keys())
    # layer-wise: every layer keeps exactly the count of the layer-wise magnitude start
    assert {n: int(m.sum()) for n, m in ticket.mask.items()} == {n: int(m.sum()) for n, m in start.items()}
    info = ticket.info
    assert info["preset"] == "faithful" and info["init_method"] == "magnitude" and info["scope"] == "layer"
    assert info["settings"]["search_lr"] == 5e-4 and info["settings"]["search_iters"] == 22
    assert info["overridden"]["search_iters"] == {"value": 22, "preset": 1100}
    assert info["cost"]["mask_updates"] == 10


def test_the_faithful_start_is_the_layerwise_magnitude_mask(tmp_path):
    ticket = prune_to_folder(load_config("digits_pgdat", TINY + ["prune.method=ntt", "prune.preset=faithful",
                                                                 "prune.search_iters=0"]),
                             str(tmp_path / "f"), progress=False)
    start = prune_to_folder(load_config("digits_pgdat", TINY + ["prune.method=magnitude", "prune.scope=layer"]),
                            str(tmp_path / "m"), progress=False).mask
    assert all(torch.equal(ticket.mask[n], start[n]) for n in start.keys())


def test_the_search_cost_is_recorded_in_seconds_and_image_passes(tmp_path):
    cfg = load_config("digits_pgdat", TINY + ["prune.method=awt", "prune.search_iters=5", "prune.search_batch=6"])
    cost = prune_to_folder(cfg, str(tmp_path / "a"), progress=False).info["cost"]
    k, b, classes, n_train = 2, 6, 10, 1257  # attack.steps, search_batch, outputs, digits' training split
    assert cost["passes_per_iteration"] == {"attack": k * b, "outputs": b, "ntk": 2 * classes * b}
    assert cost["image_passes"] == 5 * (k * b + b + 2 * classes * b)
    assert cost["pgd_at_epoch_image_passes"] == n_train * (k + 1)
    assert cost["pgd_at_epochs_equivalent"] == pytest.approx(cost["image_passes"] / (n_train * (k + 1)))
    assert cost["seconds"] > 0 and cost["iterations"] == 5
    clean = load_config("digits_pgdat", TINY + ["prune.method=ntt", "prune.search_iters=5", "prune.search_batch=6",
                                                "prune.ntk_mode=projected"])
    cost = prune_to_folder(clean, str(tmp_path / "n"), progress=False).info["cost"]
    assert cost["passes_per_iteration"] == {"attack": 0, "outputs": b, "ntk": 2 * b}  # clean points, one row


def test_a_faithful_search_killed_between_mask_updates_resumes_to_the_same_ticket_and_update_log(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from robustsparse.sparse.ticket import load_ticket
    args = ["prune", "digits_pgdat", *TINY, *FAITHFUL_SMALL[:1], "prune.search_iters=10", "prune.mask_update_every=2",
            "prune.search_batch=8", "prune.checkpoint_every=2", "--method", "awt", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda a, extra=None: subprocess.run([sys.executable, "-m", "robustsparse", *a],  # noqa: E731
                                               env={**env, **(extra or {})}, capture_output=True, text=True,
                                               timeout=300)
    assert run(args + [str(tmp_path / "ref")]).returncode == 0
    dead = run(args + [str(tmp_path / "k")], {"ROBUSTSPARSE_KILL_AT_STEP": "7"})  # after the updates at 2, 4, 6
    assert dead.returncode == -9, dead.stderr
    resumed = run(["prune", "--resume", "--out", str(tmp_path / "k")])
    assert resumed.returncode == 0, resumed.stderr
    (a, meta_a), (b, meta_b) = load_ticket(str(tmp_path / "ref")), load_ticket(str(tmp_path / "k"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    updates = [json.load(open(tmp_path / d / "prune.json"))["mask_updates"] for d in ("ref", "k")]
    assert updates[0] == updates[1] and [u["iter"] for u in updates[0]] == [2, 4, 6, 8]


def test_a_run_trained_from_a_ticket_names_its_search_preset_in_run_json(tmp_path):
    import json
    from robustsparse.train import train
    cfg = load_config("digits_pgdat", TINY + ["prune.method=awt"] + FAITHFUL_SMALL[:1] + ["prune.search_iters=2",
                                                                                          "prune.search_batch=4"])
    prune_to_folder(cfg, str(tmp_path / "t"), progress=False)
    train(load_config("digits_pgdat", TINY + ["train.epochs=1", f"train.ticket={tmp_path / 't'}"]),
          str(tmp_path / "run"), progress=False)
    ticket = json.load(open(tmp_path / "run" / "run.json"))["ticket"]
    assert ticket["method"] == "awt" and ticket["preset"] == "faithful"
    assert ticket["settings"]["init_method"] == "magnitude" and ticket["settings"]["search_iters"] == 2
    assert ticket["cost"]["iterations"] == 2 and ticket["path"] == str(tmp_path / "t")
