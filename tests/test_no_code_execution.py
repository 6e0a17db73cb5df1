"""No code execution from files: a scan of the library's source (its syntax tree, not its text) for every way a
file could make us run code — pickle and its relatives, ``torch.load`` without ``weights_only=True``,
``numpy.load(allow_pickle=True)``, builtin ``eval``/``exec``/``compile``, and YAML loaders other than the safe one.
The scanner is itself tested on snippets that must be flagged, so the scan cannot pass by seeing nothing.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

import robustsparse

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                     "pickletools", "copyreg"}
UNSAFE_YAML = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader", "UnsafeLoader",
               "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every construct in ``source`` that could execute code taken from a file, as 'file:line: what'."""
    found = []
    tree = ast.parse(source, filename)
    safe_loaders = SAFE_YAML_LOADERS | {  # classes of this file that subclass a safe loader
        n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
        and any(_dotted(b).split(".")[-1] in SAFE_YAML_LOADERS for b in n.bases)}
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in FORBIDDEN_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            names = {a.name for a in node.names}
            if module == "torch" and "load" in names:
                found.append(f"{where}: from torch import load (use torch.load(..., weights_only=True) explicitly)")
            if module == "yaml" and names & (UNSAFE_YAML | {"load", "load_all"}):
                found.append(f"{where}: from yaml import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec", "compile"):
                found.append(f"{where}: builtin {name}()")
            elif name in ("__import__", "importlib.import_module") and not (
                    node.args and isinstance(node.args[0], ast.Constant)):
                found.append(f"{where}: {name}() of a computed name")
            elif name in ("torch.load", "torch.serialization.load"):
                if not _is_const(_kw(node, "weights_only"), True):
                    found.append(f"{where}: {name} without weights_only=True")
            elif name in ("torch.jit.load", "torch.hub.load", "torch.package.PackageImporter"):
                found.append(f"{where}: {name} (unpickles or fetches code)")
            elif name in ("np.load", "numpy.load"):
                allow = _kw(node, "allow_pickle")
                if allow is not None and not _is_const(allow, False):
                    found.append(f"{where}: {name} with allow_pickle")
            elif name in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if _dotted(loader).split(".")[-1] not in safe_loaders:
                    found.append(f"{where}: {name} without SafeLoader (use yaml.safe_load)")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml" \
                and node.attr in UNSAFE_YAML:
            found.append(f"{where}: yaml.{node.attr}")
    return found


def _library_sources() -> list[pathlib.Path]:
    root = pathlib.Path(robustsparse.__file__).parent
    return sorted(root.rglob("*.py"))


# The one deliberate exception, by file and construct: `eval --model package.module:function` imports the module
# the user named on the command line (their own code, explicitly asked for); the name never comes from a file.
ALLOWED = {("eval/external.py", "importlib.import_module() of a computed name")}


def test_library_source_never_runs_code_from_files():
    files = _library_sources()
    assert len(files) > 40  # the whole package, not an empty glob
    root = pathlib.Path(robustsparse.__file__).parent
    found = [(path.relative_to(root).as_posix(), v) for path in files
             for v in violations(path.read_text(encoding="utf-8"), str(path))]
    allowed = {(rel, v.split(": ", 1)[1]) for rel, v in found} & ALLOWED
    problems = [v for rel, v in found if (rel, v.split(": ", 1)[1]) not in ALLOWED]
    assert problems == [], "code execution from files is possible:\n" + "\n".join(problems)
    assert allowed == ALLOWED, "an allowed exception no longer exists; remove it from ALLOWED"


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "import dill as d",
    "from joblib import load",
    "import marshal",
    "from _pickle import loads",
    "torch.load(path)",
    "torch.load(path, weights_only=False)",
    "torch.load(path, weights_only=flag)",
    "from torch import load",
    "torch.jit.load(path)",
    "np.load(path, allow_pickle=True)",
    "numpy.load(path, allow_pickle=x)",
    "eval(text)",
    "exec(code)",
    "compile(src, 'f', 'exec')",
    "__import__(name)",
    "importlib.import_module(text)",
    "class L(yaml.Loader): pass\nyaml.load(fh, Loader=L)",
    "yaml.load(fh)",
    "yaml.load(fh, Loader=yaml.Loader)",
    "yaml.load(fh, yaml.FullLoader)",
    "yaml.unsafe_load(fh)",
    "yaml.full_load(fh)",
    "x = yaml.UnsafeLoader",
    "from yaml import load",
])
def test_scanner_flags_each_unsafe_construct(snippet):
    assert violations(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "torch.load(path, weights_only=True)",
    "np.load(path)",
    "np.load(path, allow_pickle=False)",
    "yaml.safe_load(fh)",
    "yaml.load(fh, Loader=yaml.SafeLoader)",
    "class L(yaml.SafeLoader): pass\nyaml.load(fh, Loader=L)",
    "__import__('torch')",
    "model.eval()",
    "self.eval()",
    "from safetensors.torch import load_file",
    "import json",
])
def test_scanner_accepts_safe_constructs(snippet):
    assert violations(snippet) == [], snippet
