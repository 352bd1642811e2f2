"""The package's layering: every module imports only its own layer or lower ones (function-local
imports included), no module reaches a ``_private`` name of another, imports form no cycle (at
module level, and with function-local imports too: only ``if TYPE_CHECKING:`` blocks, which never
run, are left out), and every module imports in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import ROOT

PKG = ROOT / "unlearn_exp"

# low to high: foundation, components and data, methods, composition (cells, reports, the toy world)
LAYERS = [
    {
        "errors",
        "checks",
        "settings",
        "families",
        "lazy",
        "config",
        "schema",
        "paths",
        "hashing",
        "atomic",
        "store",
        "registry",
        "identity",
        "validate",
        "paper",
        "progress",
        "quiet",
        "runtime",
        "training",
        "launch",
        "__init__",
    },
    {"models", "data"},
    {"guidance", "sampling", "evaluation", "inversion", "unlearning", "attacks"},
    {
        "toy",
        "cell",
        "attack",
        "grids",
        "precondition",
        "tracking",
        "report",
        "dashboard",
        "demo",
        "cli",
        "describe",
        "__main__",
        "bench",
        "artifacts",
        "plan",
        "assets",
    },
]


def _module_name(path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "config" and len(parts) == 3:
        return 0  # a method's settings (guidance/config.py, ...): the schema imports them, no torch
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _imports(path, module_level_only=False):
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("unlearn_exp"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unlearn_exp"):
            if node.module == "unlearn_exp":
                yield from (f"unlearn_exp.{a.name}" for a in node.names)
            else:
                yield node.module


def _runtime_nodes(tree):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _targets(path, modules, type_only: bool = False):
    """The package modules ``path`` imports at run time (anywhere in it; with ``type_only``, in
    ``if TYPE_CHECKING:`` blocks too): ``from pkg import sub`` counts as importing ``pkg.sub`` where
    that is a module."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if type_only else _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unlearn_exp"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                yield sub if sub in modules else node.module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _files():
    return sorted(p for p in PKG.rglob("*.py") if "weights" not in p.parts)


def test_no_module_imports_a_higher_layer():
    wrong = []
    for path in _files():
        me = _module_name(path)
        for target in _imports(path):
            if _layer(target) > _layer(me):
                wrong.append(f"{me} (layer {_layer(me)}) imports {target} (layer {_layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_module_level_imports_form_no_cycle():
    graph = {_module_name(p): set(_imports(p, module_level_only=True)) for p in _files()}
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, node]))
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for nxt in sorted(graph[node]):
            visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    modules = [_module_name(p) for p in _files() if p.name != "__main__.py"]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_no_import_circle_even_through_function_local_imports():
    files = {_module_name(p): p for p in _files()}
    graph = {m: {t for t in _targets(p, files) if t in files and t != m} for m, p in files.items()}
    circles = _cycles(graph)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_import_circle_even_through_type_only_imports():
    """Annotations too: the cell's stage dataclasses live in a leaf module (``cell/stages.py``)."""
    files = {_module_name(p): p for p in _files()}
    graph = {
        m: {t for t in _targets(p, files, type_only=True) if t in files and t != m} for m, p in files.items()
    }
    circles = _cycles(graph)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_cycle_finder_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_private_name_of_another():
    wrong = []
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unlearn_exp"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        wrong.append(f"{_module_name(path)}:{node.lineno} imports {node.module}.{a.name}")
    assert not wrong, "\n".join(wrong)


# functions still longer than the limit, each at most as long as it is now: the list only shrinks
MAX_LINES = 80
LONG_FUNCTIONS: dict[tuple[str, str], int] = {}  # (file, function) -> lines: none left


def test_functions_are_short():
    """No function of the package over ``MAX_LINES`` lines but the listed ones, none of which may grow
    (their complexity is held by ruff's C901 at 15: pyproject.toml)."""
    found = {}
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found[(path.relative_to(PKG).as_posix(), node.name)] = lines
    grown = {k: v for k, v in found.items() if v > LONG_FUNCTIONS.get(k, MAX_LINES)}
    assert not grown, f"functions over {MAX_LINES} lines (split them): {grown}"
