"""`robustsparse bench`: both loops take the same PGD-AT step; the JSON and the table; --inference dispatch."""
import copy
import json
import sys
import types

import pytest
import torch

import robustsparse as rs
from robustsparse.pipelines.bench import EPS, LR, MOMENTUM, WEIGHT_DECAY, bench_config, plain_step
from robustsparse.cli import main
from robustsparse.sparse import sparsity_report
from robustsparse.train.engine import Engine
from robustsparse.train.objectives import build_objective


def test_our_step_and_the_plain_step_are_the_same_step():
    """Same init, data and random start: the textbook loop and the engine's pgd_at step give the same loss and the
    same updated weights (ours only skips the parameter gradients the textbook attack throws away)."""
    torch.manual_seed(0)
    ours = rs.build_model("cnn", 1, 10, (8, 8), width=8)
    plain, init = copy.deepcopy(ours), copy.deepcopy(ours)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    k = 3
    sgd = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    engine = Engine.create(torch.device("cpu"))
    objective = build_objective(engine.prepare_model(ours), bench_config(k))
    opt_ours, opt_plain = torch.optim.SGD(ours.parameters(), **sgd), torch.optim.SGD(plain.parameters(), **sgd)
    for step in range(2):
        torch.manual_seed(10 + step)
        ours.train()
        loss_ours = engine.step(objective, opt_ours, x, y).loss.item()
        torch.manual_seed(10 + step)
        loss_plain = plain_step(plain, opt_plain, x, y, EPS, 2.5 * EPS / k, k)
        assert loss_ours == pytest.approx(loss_plain, abs=1e-5)
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    assert not torch.equal(ours.net.features[0].weight, init.net.features[0].weight)  # a real step was taken


def test_bench_cli_writes_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "--model", "cnn", "--model-option", "width=4", "--batch", "8", "--steps", "2",
                     "--iters", "2", "--warmup", "1", "--repeats", "3", "--device", "cpu", "--threads", "1",
                     "--density", "0.5", "--json", str(path), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    table = capsys.readouterr().out
    assert "| ours (fp32) |" in table and "| plain PyTorch loop" in table and "Speed-up, ours / plain" in table
    r = json.loads(path.read_text())
    assert r["format"] == "robustsparse-bench/1"
    assert (r["model"], r["input_shape"], r["batch"], r["attack_steps"], r["device"]) == ("cnn", [1, 8, 8], 8, 2,
                                                                                          "cpu")
    assert r["threads"]["torch_threads"] == 1 and r["torch"] == torch.__version__
    assert r["engine"] == {"device": "cpu", "amp": "fp32", "channels_last": False, "compile": False,
                           "world_size": 1, "sync_bn": None}
    macs = sparsity_report(rs.build_model("cnn", 1, 10, (8, 8), width=4), (1, 8, 8)).dense_macs
    assert r["forward_macs_per_image"] == macs and r["flops_per_image"] == 2 * macs * 3 * (2 + 1)
    for loop in ("ours", "plain"):
        res = r["results"][loop]
        assert len(res["block_images_per_s"]) == 3 and all(v > 0 for v in res["block_images_per_s"])
        assert res["images_per_s"] == sorted(res["block_images_per_s"])[1]  # the median block
        assert res["flops_per_s"] == pytest.approx(res["images_per_s"] * r["flops_per_image"])
        assert res["ms_per_step"] == pytest.approx(1000 * 8 / res["images_per_s"])
    assert r["speedup"] == pytest.approx(r["results"]["ours"]["images_per_s"] / r["results"]["plain"]["images_per_s"])
    ratios = sorted(o / p for o, p in zip(r["results"]["ours"]["block_images_per_s"],
                                          r["results"]["plain"]["block_images_per_s"]))
    assert r["speedup_paired_median"] == pytest.approx(ratios[1])
    assert r["density"] == 0.5


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--input-shape", "3,32"]) == 2
    assert "--input-shape must be C,H,W" in capsys.readouterr().err
    assert main(["bench", "--batch", "0", "--no-progress"]) == 2
    assert main(["bench", "--json", str(tmp_path / "missing" / "b.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_inference_is_handed_to_export(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("robustsparse.export")
    fake.bench_inference = lambda args: seen.append((args.model, args.inference)) or 0
    monkeypatch.setitem(sys.modules, "robustsparse.export", fake)
    assert main(["bench", "--inference", "--model", "resnet18", "--input-shape", "3,32,32"]) == 0
    assert seen == [("resnet18", True)]
    monkeypatch.setitem(sys.modules, "robustsparse.export", types.ModuleType("robustsparse.export"))
    assert main(["bench", "--inference"]) == 2
    assert "export not available" in capsys.readouterr().err
