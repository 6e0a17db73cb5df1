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
from robustsparse.train.skilled_loop import SkilledLoop, skilled_pgd


def test_our_step_and_the_plain_step_are_the_same_step():
    """Same init, data and random start: the textbook loop and the engine's pgd_at step give the same loss and the
    same updated weights (ours only skips the parameter gradients the textbook attack throws away).

    In float64: the two loops' PGD runs through sign(), which turns any last-bit difference in an input gradient
    into a full alpha step. Today both loops run the same kernels (ours sums the loss, the textbook averages it: a
    power-of-two scale, exact), and the difference is 0 in float32 on AVX-512, AVX2 and oneDNN-off kernels; float64
    keeps the test independent of that, since reduction orders then agree to ~1e-16 and only exact ties flip."""
    torch.manual_seed(0)
    ours = rs.build_model("cnn", 1, 10, (8, 8), width=8).double()
    plain, init = copy.deepcopy(ours), copy.deepcopy(ours)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g)
    k = 3
    sgd = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    engine = Engine.create(torch.device("cpu"), amp="fp32")  # the textbook step is fp32: compare like with like
    objective = build_objective(engine.prepare_model(ours), bench_config(k))
    opt_ours, opt_plain = torch.optim.SGD(ours.parameters(), **sgd), torch.optim.SGD(plain.parameters(), **sgd)
    for step in range(2):
        torch.manual_seed(10 + step)
        ours.train()
        loss_ours = engine.step(objective, opt_ours, x, y).loss.item()
        torch.manual_seed(10 + step)
        loss_plain = plain_step(plain, opt_plain, x, y, EPS, 2.5 * EPS / k, k)
        assert loss_ours == pytest.approx(loss_plain, rel=0, abs=1e-10)  # float64 rounding is ~1e-16
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-10), name
    assert not torch.equal(ours.net.features[0].weight, init.net.features[0].weight)  # a real step was taken


def test_bench_cli_writes_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "--model", "cnn", "--model-option", "width=4", "--batch", "8", "--steps", "2",
                     "--iters", "2", "--warmup", "1", "--repeats", "3", "--device", "cpu", "--threads", "1", "--amp", "fp32",
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
    assert r["engine"] == {"device": "cpu", "amp": "fp32", "amp_reason": "amp=fp32 requested",
                           "channels_last": False, "compile": False,
                           "world_size": 1, "sync_bn": None}
    macs = sparsity_report(rs.build_model("cnn", 1, 10, (8, 8), width=4), (1, 8, 8)).dense_macs
    assert r["forward_macs_per_image"] == macs and r["flops_per_image"] == 2 * macs * 3 * (2 + 1)
    assert r["executed_flops_per_image"] == {"ours": 2 * macs * 7, "skilled": 2 * macs * 7, "plain": 2 * macs * 9}
    for loop in ("ours", "skilled", "plain"):
        res = r["results"][loop]
        assert len(res["block_images_per_s"]) == 3 and all(v > 0 for v in res["block_images_per_s"])
        assert res["images_per_s"] == sorted(res["block_images_per_s"])[1]  # the median block
        assert res["flops_per_s"] == pytest.approx(res["images_per_s"] * r["flops_per_image"])
        assert res["ms_per_step"] == pytest.approx(1000 * 8 / res["images_per_s"])
        assert res["executed_flops_per_s"] == pytest.approx(res["images_per_s"] * r["executed_flops_per_image"][loop])
        if r["peak"]["fp32"]:  # on Linux: the peak from /proc/cpuinfo
            assert res["share_of_peak"]["fp32"] == pytest.approx(res["executed_flops_per_s"] / r["peak"]["fp32"])
    assert r["speedup_vs_skilled"] == pytest.approx(
        r["results"]["ours"]["images_per_s"] / r["results"]["skilled"]["images_per_s"])
    assert "| skilled plain loop" in table and "Ours / skilled" in table
    assert r["speedup"] == pytest.approx(r["results"]["ours"]["images_per_s"] / r["results"]["plain"]["images_per_s"])
    ratios = sorted(o / p for o, p in zip(r["results"]["ours"]["block_images_per_s"],
                                          r["results"]["plain"]["block_images_per_s"]))
    assert r["speedup_paired_median"] == pytest.approx(ratios[1])
    assert r["density"] == 0.5


def test_the_skilled_loop_trains():
    """Digits, PGD-2 AT: the skilled baseline's training loss falls (it is a real training loop, not a timer)."""
    x, y = rs.load_dataset("digits", split="train")
    torch.manual_seed(0)
    model = rs.build_model("cnn", 1, 10, (8, 8), width=8)
    loop = SkilledLoop(model, x[:512], y[:512], 64, 2, 0.05, 0.05, 40, torch.device("cpu"), seed=0)
    loop.run(40)
    losses = torch.stack(loop.losses)
    assert losses[-8:].mean() < 0.8 * losses[:8].mean(), losses
    assert loop.scheduler.get_last_lr()[0] < 1e-3 * 0.05 + 1e-12  # the cosine schedule reached its end


def test_the_skilled_attack_is_our_attack():
    """Same weights, batch and seed: the skilled PGD (batch-mean loss, torch.autograd.grad, parameters requiring
    grad) and our PGD (batch-sum loss, parameters frozen) return the same adversarial examples. The batch of 16
    makes mean = sum / 16 an exact power-of-two scaling, so every gradient sign agrees unless two kernels round
    differently; tolerance: at most 0.5% of the pixels may differ (a near-zero gradient component flipping sign,
    then one α step apart per step it lasted), and none by more than 2ε."""
    from robustsparse.attacks.pgd import PGD
    torch.manual_seed(0)
    model = rs.build_model("cnn", 1, 10, (8, 8), width=8).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    k, eps = 5, 0.1
    torch.manual_seed(7)
    ours = PGD(model, eps, steps=k, alpha=2.5 * eps / k)(x, y)
    torch.manual_seed(7)
    skilled = skilled_pgd(model, x, y, eps, 2.5 * eps / k, k)
    differ = (ours - skilled).abs() > 1e-6
    assert differ.float().mean() <= 0.005, differ.float().mean()
    assert (ours - skilled).abs().max() <= 2 * eps + 1e-6
    assert (ours - x).abs().max() > 0.5 * eps  # a real attack moved the points


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


def test_the_peak_follows_the_documented_formula(tmp_path):
    """cores x clock x FLOP/cycle: 2 FMA x 16 lanes x 2 with AVX-512 on Intel and on Zen 5 (family 26), 8 lanes on
    earlier AMD or with AVX2; bf16 2x fp32 with AVX512-BF16, 1024/cycle with AMX-BF16; parsed from a cpuinfo file
    as the kernel writes it."""
    from robustsparse.runs.machine import cpu_peak, cpuinfo
    text = "".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\ncpu MHz\t\t: 2000.000\n"
                   f"physical id\t: 0\ncore id\t\t: {i}\nflags\t\t: fma avx2 avx512f avx512_bf16 amx_bf16\n\n"
                   for i in range(2))
    (tmp_path / "cpuinfo").write_text(text)
    info = cpuinfo(str(tmp_path / "cpuinfo"))
    assert info["model"] == "Xeon" and len(info["cores"]) == 2 and info["mhz"] == 2000.0
    intel = cpu_peak(threads=1, info=info)
    hz = max(2000.0, intel["mhz"]) * 1e6  # cpufreq's maximum wins where the machine has one
    assert intel["cores"] == 1 and intel["fp32"] == pytest.approx(hz * 64) and intel["bf16"] == pytest.approx(hz * 1024)
    vnni = cpu_peak(threads=1, info={**info, "flags": {"avx512f", "avx512_bf16"}})
    assert vnni["bf16"] == pytest.approx(2 * vnni["fp32"]) and vnni["bf16_unit"] == "avx512_bf16"
    amd = cpu_peak(threads=1, info={**info, "vendor": "AuthenticAMD", "family": 25, "flags": {"avx2", "avx512f"}})
    assert amd["fp32_flop_per_cycle"] == 32 and amd["bf16"] is None  # Zen 4: AVX-512 on 256-bit units
    zen5 = cpu_peak(threads=1, info={**info, "vendor": "AuthenticAMD", "family": 26,
                                     "flags": {"avx2", "avx512f", "avx512_bf16"}})
    assert zen5["fp32_flop_per_cycle"] == 64 and zen5["bf16_flop_per_cycle"] == 128
    assert cpuinfo(str(tmp_path / "cpuinfo")).get("family") is None  # no "cpu family" line: not guessed
    amd_text = text.replace("GenuineIntel", "AuthenticAMD").replace("model name", "cpu family\t: 26\nmodel name")
    (tmp_path / "amd").write_text(amd_text)
    assert cpuinfo(str(tmp_path / "amd"))["family"] == 26
