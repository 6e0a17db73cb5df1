"""Sparse export: a deployable model whose inference skips what the mask zeroed, and its benchmark.

    from robustsparse.export import export_run, load_exported
    export_run("runs/digits", "exports/digits")          # = robustsparse export runs/digits --out exports/digits
    model = load_exported("exports/digits")              # hashes verified; nn.Module, images -> logits
    ort_model = load_onnx("exports/digits")              # --format onnx: ONNX Runtime session, hash verified

`compile_model` does the same in memory (used by `bench_inference`, i.e. ``robustsparse bench --inference``).
The folder layout and the checks are in `export.py`; the runtime (also copied to ``load_sparse.py``) in
`runtime.py`.
"""
from .bench import bench_inference, build_masked_model
from .export import CompiledExport, compile_model, export_model, export_run, load_exported
from .onnxrt import OnnxModel, load_onnx, run_onnx

__all__ = ["export_run", "export_model", "compile_model", "load_exported", "bench_inference",
           "build_masked_model", "CompiledExport", "load_onnx", "run_onnx", "OnnxModel"]
