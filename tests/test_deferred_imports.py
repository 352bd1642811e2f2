"""Imports inside functions: each defers something heavy, an optional dependency or a plugin."""

from __future__ import annotations

import ast

from tests.test_layers import _files, _module_name

# ----------------------------------------------------------------------------- deferred imports
# An import inside a function defers something heavy to load (so that composing, validating,
# planning and the recorded-result rerun never load it), or an optional dependency, or a plugin
# (importlib). Everything else is imported at module level.
HEAVY = {
    "torch",
    "torchvision",
    "torchmetrics",
    "diffusers",
    "transformers",
    "open_clip",
    "onnxruntime",
    "onnx",
    "lightning",
    "peft",
    "nudenet",
    "lpips",
    "timm",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "matplotlib",
    "pandas",
    "pyarrow",
    "numpy",
    "scipy",
    "PIL",
    "hydra",
    "wandb",
}
OPTIONAL = {"wandb_workspaces", "google"}  # extras: wandb's report API, its protobuf messages
PLUGIN = {"importlib"}  # methods, hooks and plugins found by name


def _module_level_targets(path, modules) -> set[str]:
    """What a module imports when it is imported (module level, ``TYPE_CHECKING`` blocks aside, try
    and if blocks included): package modules by name, others by their top-level package."""
    out: set[str] = set()

    def walk(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                out.update(a.name if a.name in modules else a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                out.update(subs or {node.module if node.module in modules else node.module.split(".")[0]})
            elif isinstance(node, ast.If) and getattr(node.test, "id", None) != "TYPE_CHECKING":
                walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)
                walk([n for h in node.handlers for n in h.body])

    walk(ast.parse(path.read_text()).body)
    return out


def _heavy_modules(files: dict) -> set[str]:
    """The package modules whose import loads something in ``HEAVY`` (through module-level imports,
    their packages' ``__init__`` included)."""
    graph = {m: _module_level_targets(p, files) for m, p in files.items()}
    for m in files:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = m.split(".")
        graph[m] |= {".".join(parts[:i]) for i in range(2, len(parts))} & set(files)
    heavy = {m for m, targets in graph.items() if targets & HEAVY}
    grown = True
    while grown:
        new = {m for m, targets in graph.items() if m not in heavy and targets & heavy}
        heavy |= new
        grown = bool(new)
    return heavy


def _lazy_names(path) -> dict[str, str]:
    """A package's lazy attributes (``_WHERE = {name: submodule}`` in its ``__init__``, imported on
    first use by ``lazy.lazy_attributes``): ``from pkg import name`` imports ``pkg.<submodule>``."""
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_WHERE":
            return ast.literal_eval(node.value)
    return {}


def test_imports_inside_functions_only_defer_something_heavy():
    files = {_module_name(p): p for p in _files()}
    heavy = _heavy_modules(files)
    wrong = []
    for me, path in files.items():
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    lazy = _lazy_names(files.get(node.module))
                    subs = [
                        f"{node.module}.{lazy.get(a.name, a.name)}"
                        for a in node.names
                        if f"{node.module}.{lazy.get(a.name, a.name)}" in files
                    ]
                    names = subs or [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in HEAVY | OPTIONAL | PLUGIN or name in heavy:
                        continue
                    wrong.append(f"{me}:{node.lineno} {fn.name}() imports {name}")
    assert not wrong, f"{len(wrong)} imports inside functions defer nothing heavy:\n" + "\n".join(wrong)


def test_the_deferred_import_rule_sees_heavy_and_light_modules():
    files = {_module_name(p): p for p in _files()}
    heavy = _heavy_modules(files)
    assert {"unlearn_exp.sampling", "unlearn_exp.guidance.sld", "unlearn_exp.cell.run"} <= heavy
    assert not {"unlearn_exp.hashing", "unlearn_exp.atomic", "unlearn_exp.settings"} & heavy


def test_composing_validating_planning_and_reporting_load_no_torch():
    import subprocess
    import sys

    modules = [
        "unlearn_exp.config",
        "unlearn_exp.validate",
        "unlearn_exp.plan",
        "unlearn_exp.describe",
        "unlearn_exp.report.reproduce",
        "unlearn_exp.report.tables",
        "unlearn_exp.demo",
        "unlearn_exp.models.memory",
    ]
    code = (
        "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        "print([m for m in ('torch', 'diffusers', 'transformers', 'lightning') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
