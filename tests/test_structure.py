"""The package's structure, measured on its own import graph (imports inside functions included): no import
circle, every import runs from a layer down to a lower one in the order docs/architecture.md writes (read from
there, so the document and the check cannot drift apart), at most six modules at the package root, and no
function longer than 80 lines (the pickle-subset parser excepted: it reads like its spec)."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "robustsparse"
ROOT_MODULES = {"__init__", "__main__", "_version", "errors", "config", "api"}
MAX_FUNCTION_LINES = 80
LONG_FUNCTION_EXCEPTIONS = {("data/pickle_subset.py", "load")}


def layer_order(doc: pathlib.Path = ROOT / "docs" / "architecture.md") -> list[list[str]]:
    """The layers, bottom first, from the fenced block after the ``<!-- layers -->`` marker of the document: one
    layer per line, ``name  description``, several names of one layer separated by commas."""
    text = doc.read_text(encoding="utf-8")
    block = re.search(r"<!-- layers -->\s*```[^\n]*\n(.*?)```", text, re.S)
    assert block, f"{doc} has no layer block (<!-- layers --> then a fenced block)"
    layers = []
    for line in block.group(1).splitlines():
        head = line.split("  ")[0].strip()
        if head:
            layers.append([n.strip().strip("`").rstrip("/") for n in head.split(",")])
    return layers[::-1]  # written top first, like a map read from the top


def modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file of ``package`` (a package is its __init__.py)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_edges(mods: dict[str, pathlib.Path]) -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported module of the package, line)}, every ``import`` statement anywhere in the file.

    ``from P import n`` is an edge to the module ``P.n`` if there is one, else to ``P``. An import of one of the
    module's own parent packages is no edge (Python has imported it first anyway)."""
    edges: dict[str, set[tuple[str, int]]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            else:
                continue
            for target in targets:
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in mods and target != name and not name.startswith(target + "."):
                    edges[name].add((target, node.lineno))
    return edges


def cycles(edges: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(t for t, _ in edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(t for t, _ in edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def unit(module: str) -> str:
    """The top-level room of a module: its folder under the package, or the root module's own name."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def upward_imports(edges, layers: list[list[str]]) -> list[str]:
    rank = {name: i for i, layer in enumerate(layers) for name in layer}
    return [f"{a} -> {b} (line {line}): {unit(a)} is not above {unit(b)}"
            for a, targets in edges.items() for b, line in sorted(targets)
            if unit(a) != unit(b) and rank[unit(a)] <= rank[unit(b)]]


def long_functions(package: pathlib.Path) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTION_EXCEPTIONS:
                    out.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    return out


# ---------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def graph():
    mods = modules(PACKAGE)
    return mods, import_edges(mods)


def test_the_import_graph_has_no_circle(graph):
    _, edges = graph
    assert sum(len(t) for t in edges.values()) > 300  # the scan sees the package's imports
    assert cycles(edges) == []


def test_every_import_runs_down_the_layers_written_in_the_architecture_doc(graph):
    mods, edges = graph
    layers = layer_order()
    named = [n for layer in layers for n in layer]
    assert len(named) == len(set(named)), "a name appears in two layers of docs/architecture.md"
    assert {unit(m) for m in mods} == set(named), "every folder and root module has exactly one layer"
    assert upward_imports(edges, layers) == []


def test_the_package_root_holds_only_the_facade():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root <= ROOT_MODULES and len(root) <= 6, sorted(root - ROOT_MODULES)


def test_no_function_is_longer_than_80_lines():
    assert long_functions(PACKAGE) == []


def test_the_version_has_one_source():
    import robustsparse
    from robustsparse._version import __version__
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert robustsparse.__version__ == __version__
    assert 'dynamic = ["version"]' in pyproject and 'attr = "robustsparse._version.__version__"' in pyproject
    assert not re.search(r'^version\s*=\s*"', pyproject, re.M)  # no second, literal copy


# ---------------------------------------------------------------- the checks can fail


def _package(tmp_path, files: dict[str, str]) -> pathlib.Path:
    pkg = tmp_path / "robustsparse"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_a_planted_circle_and_an_upward_import_are_found(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "from .low import a\n",
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from ..high.b import g  # inside a function: still an edge\n    return g\n",
        "high/__init__.py": "",
        "high/b.py": "from ..low import a\n\ndef g():\n    return a\n",
        "errors.py": "",
    })
    mods = modules(pkg)
    edges = import_edges(mods)
    assert cycles(edges) == [["robustsparse.high.b", "robustsparse.low.a"]]
    layers = [["errors"], ["low"], ["high"], ["__init__"]]
    assert upward_imports(edges, layers) == ["robustsparse.low.a -> robustsparse.high.b (line 2): low is not above "
                                             "high"]
    # the same package without the function-level import: no circle, nothing upward
    (pkg / "low" / "a.py").write_text("def f():\n    return 1\n")
    edges = import_edges(modules(pkg))
    assert cycles(edges) == [] and upward_imports(edges, layers) == []


def test_a_planted_long_function_is_found(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    pkg = _package(tmp_path, {"__init__.py": "", "m.py": f"def long():\n{body}\n\ndef short():\n    return 1\n"})
    assert long_functions(pkg) == [f"m.py:1 long: {MAX_FUNCTION_LINES + 1} lines"]


def test_the_layer_block_is_parsed_from_the_document(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# x\n\n<!-- layers -->\n```\ncli/        top\napi, config  middle\nerrors      bottom\n```\n")
    assert layer_order(doc) == [["errors"], ["api", "config"], ["cli"]]
