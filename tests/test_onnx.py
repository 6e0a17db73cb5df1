"""ONNX export checked in ONNX Runtime (export/onnxrt.py): dense, masked and SMART-at-λ models give the PyTorch
eval-mode logits within 1e-4; a tampered file, a wrong-shape input or a missing runtime is a clear UserError."""
import json
import os
import sys

import pytest
import torch

import robustsparse as rs
from robustsparse.cli import main
from robustsparse.errors import UserError
from robustsparse.export import export_model, load_onnx, run_onnx
from robustsparse.export.bench import _options, build_masked_model, run_inference_bench
from robustsparse.ofa import make_conditional
from robustsparse.runs.checkpoint import save_checkpoint

# ONNX Runtime runs its own kernels (MLAS convolutions with BN folded in at session start) where PyTorch runs
# oneDNN/ATen ones with BN separate: the same float32 arithmetic in another summation order, ~1e-6 relative.
# 1e-4 absolute on logits of O(1-10) covers that on any x86 CPU (AVX2, AVX-512, AMX) with two orders to spare,
# and is the tolerance `export` itself enforces; a wrong graph (a lost mask, BN in train mode) is off by > 1e-2.
TOL = 1e-4
SMART = dict(lambdas=[0.0, 0.1, 0.2, 0.3, 0.4, 1.0], encoding="rand", encoding_dim=128, noise_init=0.25,
             density_clean=0.3, density_adv=0.6, overlap="nested", split_from=0, mask_source="random", mix="weight")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _ort_vs_torch(model, folder, shape, batches=(1, 5, 9)):
    """max |ORT − torch| over batch sizes including ones the export never saw (the batch axis is dynamic)."""
    ort = load_onnx(folder)
    worst = 0.0
    for b in batches:
        x = torch.rand((b, *shape), generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = model.eval()(x)
        got = ort(x)
        assert got.shape == ref.shape == (b, 10)
        worst = max(worst, float((ref - got).abs().max()))
    return worst


def _export(model, out, shape):
    return export_model(model, str(out), formats="safetensors,onnx", input_shape=shape, batches=[1, 4],
                        choose="rule", progress=False)


def test_dense_model_in_onnxruntime_equals_pytorch(tmp_path):
    torch.manual_seed(0)
    model = rs.build_model("resnet18", 3, 10, (8, 8)).eval()
    meta = _export(model, tmp_path / "e", (3, 8, 8))
    entry = meta["onnx"]
    assert entry["input"]["shape"] == ["batch", 3, 8, 8] and entry["equality"]["passed"]
    assert max(entry["equality"]["max_abs_logit_diff"].values()) <= TOL
    assert json.loads((tmp_path / "e" / "export.json").read_text())["onnx"]["sha256"] == entry["sha256"]
    assert _ort_vs_torch(model, str(tmp_path / "e"), (3, 8, 8)) <= TOL


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_masked_model_in_onnxruntime_equals_masked_pytorch(tmp_path, structure):
    model = build_masked_model("cnn", "1x8x8", 10, 0.1, structure, "random", options={"width": 16})
    _export(model, tmp_path / "e", (1, 8, 8))
    assert _ort_vs_torch(model, str(tmp_path / "e"), (1, 8, 8)) <= TOL
    # The graph carries the mask: its weight initialisers hold at least as many zeros as the mask removed.
    import onnx
    from onnx import numpy_helper
    from robustsparse.sparse import get_mask
    mask = get_mask(model)
    removed = mask.total() - mask.kept()
    graph = onnx.load(str(tmp_path / "e" / "model.onnx")).graph
    zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in graph.initializer if len(t.dims) >= 2)
    assert removed > 0 and zeros >= removed


def test_smart_at_lambda_export_from_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model = make_conditional(rs.build_model("cnn", 1, 10, (8, 8), width=8), {"method": "smart", "options": SMART,
                                                                              "seed": 0})
    spec = {"name": "cnn", "in_channels": 1, "num_classes": 10, "input_size": [8, 8], "mean": None, "std": None,
            "options": {"width": 8}, "ofa": {"method": "smart", "options": SMART, "seed": 0}}
    run = str(tmp_path / "run")
    save_checkpoint(os.path.join(run, "checkpoints"), "best",
                    {f"model.{k}": v for k, v in model.state_dict().items()}, {"model_spec": spec, "epoch": 1})
    out = str(tmp_path / "smart03")
    assert main(["export", run, "--out", out, "--lam", "0.3", "--format", "onnx", "--batches", "1,3",
                 "--choose", "rule", "--no-progress"]) == 0
    assert "onnx:" in capsys.readouterr().out
    meta = json.loads(open(os.path.join(out, "export.json")).read())
    assert meta["source"]["lam"] == 0.3 and meta["source"]["mix"] == "weight"
    at_03 = rs.load(run, lam=0.3)
    assert _ort_vs_torch(at_03, out, (1, 8, 8)) <= TOL
    # λ matters: the robust end's logits are not the ones exported at 0.3.
    x = torch.rand((4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((rs.load(run, lam=1.0)(x) - run_onnx(out, x)).abs().max()) > 10 * TOL  # untrained: logits ~0.05


def test_tampered_file_and_wrong_inputs_are_refused(tmp_path):
    model = build_masked_model("cnn", "1x8x8", 10, 0.1, "unstructured", "random", options={"width": 8})
    folder = tmp_path / "e"
    _export(model, folder, (1, 8, 8))
    ort = load_onnx(str(folder))
    for bad in (torch.rand(2, 3, 8, 8), torch.rand(1, 8, 8), torch.rand(2, 1, 8, 9)):
        with pytest.raises(UserError, match=r"shape \(N, 1, 8, 8\)"):
            ort(bad)
    with pytest.raises(UserError, match="float images"):
        ort(torch.zeros(2, 1, 8, 8, dtype=torch.int64))
    path = folder / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the SHA-256"):
        load_onnx(str(folder))
    path.unlink()
    with pytest.raises(UserError, match="missing"):
        run_onnx(str(folder), torch.rand(1, 1, 8, 8))
    plain = tmp_path / "plain"
    export_model(model, str(plain), batches=[1], choose="rule", progress=False)
    with pytest.raises(UserError, match="no ONNX model"):
        load_onnx(str(plain))


def test_onnx_requested_without_onnxruntime_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    model = build_masked_model("cnn", "1x8x8", 10, 0.1, "unstructured", "random", options={"width": 8})
    with pytest.raises(UserError, match="onnxruntime package, which is not installed"):
        _export(model, tmp_path / "e", (1, 8, 8))
    assert not os.path.exists(tmp_path / "e")
    # The CLI says so in one line with exit status 2, before loading anything.
    assert main(["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "e2"), "--format", "onnx"]) == 2
    assert "onnxruntime" in capsys.readouterr().err and not os.path.exists(tmp_path / "e2")
    # bench --inference leaves the ONNX Runtime row out and says why.
    result = run_inference_bench(_bench_opts(), progress=False)
    assert "not installed" in result["onnxruntime"] and all("onnxruntime_ms" not in r for r in result["rows"])


def _bench_opts():
    return _options(type("A", (), {"model": "cnn", "input_shape": "1,8,8", "structure": "unstructured",
                                    "inference_batches": "1,4", "repeats": 2, "warmup": 1, "threads": 1,
                                    "model_option": ["width=8"], "choose": "rule"})())


def test_bench_inference_times_onnxruntime_beside_dense_and_export():
    result = run_inference_bench(_bench_opts(), progress=False)
    assert result["onnxruntime"].startswith("onnxruntime ")
    for r in result["rows"]:
        assert r["onnxruntime_ms"] > 0 and r["onnxruntime_max_abs_logit_diff"] <= TOL
        assert r["speedup_vs_onnxruntime"] == pytest.approx(r["onnxruntime_ms"] / r["exported_ms"])
