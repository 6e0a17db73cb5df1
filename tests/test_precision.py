"""train.amp=auto: bf16 only on CPUs with native bf16 (detection mocked both ways), recorded in run.json; reported
attacks and the evaluator stay fp32 under any enclosing autocast; a bf16 run resumes bit for bit."""
import json
import os
import subprocess
import sys

import pytest
import torch

import robustsparse as rs
from robustsparse.attacks.autoattack import run_component
from robustsparse.config import load_config
from robustsparse.errors import UserError
from robustsparse.runs.checkpoint import find_checkpoint, load_checkpoint
from robustsparse.train import engine as engine_mod
from robustsparse.train import precision
from robustsparse.train.engine import Engine

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "cpu has amx_bf16")


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: None)


def test_auto_picks_bf16_on_a_cpu_with_native_bf16(native_bf16):
    engine = Engine.create(CPU)
    assert engine.amp == "bf16" and engine.scaler is None
    assert engine.describe()["amp_reason"] == "auto: cpu has amx_bf16"
    assert isinstance(engine.autocast(), torch.autocast)


def test_auto_picks_fp32_on_a_cpu_without_native_bf16(no_native_bf16):
    engine = Engine.create(CPU)
    assert engine.amp == "fp32" and engine.describe()["amp_reason"].startswith("auto: cpu has neither")


def test_an_explicit_amp_wins_over_detection(native_bf16):
    engine = Engine.create(CPU, amp="fp32")
    assert (engine.amp, engine.amp_reason) == ("fp32", "amp=fp32 requested")


def test_detection_reads_the_cpuinfo_flags(tmp_path, monkeypatch):
    def cpuinfo(flags):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
        return str(path)

    real = precision.cpu_flags
    for flags, expected in (("avx2 fma", None), ("avx512f avx512_bf16", "cpu has avx512_bf16"),
                            ("avx512_bf16 amx_tile amx_bf16", "cpu has amx_bf16 and avx512_bf16")):
        path = cpuinfo(flags)
        monkeypatch.setattr(precision, "cpu_flags", lambda path=path: real(path))
        assert precision.cpu_bf16_support() == expected, flags
    # no /proc/cpuinfo (macOS, Windows): torch's cpuinfo query decides
    monkeypatch.setattr(precision, "cpu_flags", lambda: None)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert precision.cpu_bf16_support() == "cpu has avx512_bf16 (torch cpuinfo)"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert precision.cpu_bf16_support() is None
    assert real(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("native", [True, False])
def test_a_run_records_the_precision_and_why(tmp_path, monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "cpu has avx512_bf16" if native else None)
    out = str(tmp_path / "run")
    cfg = load_config("digits_pgdat", ["train.epochs=1", "model.options={width: 4}", "attack.steps=1",
                                       "train.val_attack_steps=1", "train.batch_size=256", "data.val_size=40",
                                       "train.amp=auto"])  # digits_pgdat pins fp32 (overhead-bound at 8x8)
    rs.train(cfg, out, progress=False)
    with open(os.path.join(out, "run.json")) as fh:
        recorded = json.load(fh)["engine"]
    if native:
        assert (recorded["amp"], recorded["amp_reason"]) == ("bf16", "auto: cpu has avx512_bf16")
    else:
        assert recorded["amp"] == "fp32" and "neither" in recorded["amp_reason"]


def _model():
    torch.manual_seed(0)
    return rs.build_model("cnn", 1, 10, (8, 8), width=8).eval()


def _output_dtypes(model):
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return seen, handles


def test_the_evaluator_is_fp32_and_unchanged_inside_a_bf16_autocast():
    """Same process, same seed: the suite gives bit-identical accuracies with and without an enclosing bf16
    autocast, and every conv/linear output inside it is fp32 (without the guard they would be bf16)."""
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)
    kwargs = dict(suite="clean,fgsm,pgd-5x2", eps=0.1, num_classes=10, batch_size=16, progress=False)
    plain = rs.evaluate(model, x, y, **kwargs)
    seen, handles = _output_dtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.net.features[0](x[:2]).dtype == torch.bfloat16  # the context does cast when not guarded
        seen.clear()
        mixed = rs.evaluate(model, x, y, **kwargs)
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.float32}
    assert mixed.accuracy == plain.accuracy and mixed.worst_case == plain.worst_case


def test_autoattack_components_are_fp32_inside_a_bf16_autocast(monkeypatch):
    """A component called directly (not through evaluate) also turns the caller's autocast off."""
    import robustsparse.attacks.autoattack as aa
    monkeypatch.setitem(aa.STANDARD_BUDGET, "apgd-ce", 5)  # the guard is under test, not the budget
    model = _model()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(12, 1, 8, 8, generator=g), torch.randint(0, 10, (12,), generator=g)
    robust = torch.ones(12, dtype=torch.bool)
    plain = run_component("apgd-ce", model, x, y, robust, 0.1, "Linf", 10, batch_size=12)
    seen, handles = _output_dtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run_component("apgd-ce", model, x, y, robust, 0.1, "Linf", 10, batch_size=12)
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.float32}
    assert torch.equal(plain, mixed)


def test_resolve_amp_rejects_unknown_precisions():
    with pytest.raises(UserError, match="amp must be one of"):
        engine_mod.resolve_amp("fp8", CPU)


TINY = ["train.epochs=2", "model.options={width: 8}", "attack.steps=2", "train.val_attack_steps=2",
        "train.batch_size=128", "train.checkpoint_every_steps=2", "train.amp=bf16"]


def _cli(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "robustsparse", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_bf16_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """bf16 autocast (native or emulated) is deterministic for a fixed thread count: resume stays bit-exact."""
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert _cli(["train", "digits_pgdat", *TINY, "--out", ref, "--no-progress"]).returncode == 0
    dead = _cli(["train", "digits_pgdat", *TINY, "--out", killed, "--no-progress"],
                {"ROBUSTSPARSE_KILL_AT_STEP": "5"})
    assert dead.returncode == -9, dead.stderr
    resumed = _cli(["train", "--resume", "--out", killed, "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    a, _ = load_checkpoint(find_checkpoint(ref, prefer="last"))
    b, _ = load_checkpoint(find_checkpoint(killed, prefer="last"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with open(os.path.join(killed, "run.json")) as fh:
        assert json.load(fh)["engine"]["amp"] == "bf16"
