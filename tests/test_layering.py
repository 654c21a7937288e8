"""Module boundaries, checked on the source with ``ast`` (STYLE.md; the layering is DESIGN.md's).

(a) Imports run downward only: a module imports only modules listed before its own in
    DESIGN.md's package layout (the modules of a package such as ``train/`` share its place).
(b) No module imports another module's private (``_name``) helpers: neither
    ``from .x import _y`` / ``from lorakit.x import _y`` nor ``x._y`` on an imported module.
(c) Inference modules (opening runs, generation, evaluation, merging, inspection, serving)
    import nothing from ``lorakit.train``, directly or through the modules they import.

Each check runs on the real tree and on small synthetic sources that break it, so a test
that could not fail would show up here. Two subprocess tests check the same at import time.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorakit"
INFERENCE = ("runs", "generation", "evaluation", "merging", "inspection", "serve")


def layers_from_design(text: str) -> list[str]:
    """Top-level modules and packages in the order of DESIGN.md's package layout (lowest first)."""
    block = re.search(r"## Package layout.*?```\n(.*?)```", text, re.S).group(1)
    names = re.findall(r"^  ([a-z][a-z0-9_]*)(?:\.py|/)\s", block, re.M)
    assert names, "no modules found in DESIGN.md's package layout"
    return names


LAYERS = layers_from_design((ROOT / "DESIGN.md").read_text())


def module_of(relpath: str) -> tuple[str, bool]:
    """(dotted name relative to lorakit, is a package) of a file path such as ``train/loop.py``."""
    parts = relpath.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imports(tree: ast.AST, name: str, is_pkg: bool, modules: set[str]):
    """Yields (target module, imported name or None for a module, line) per lorakit import; fills bindings."""
    bindings: dict[str, str] = {}  # local name -> lorakit module it refers to
    found = []
    package = (name.split(".") if is_pkg else name.split(".")[:-1]) if name else []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            elif node.module == "lorakit" or (node.module or "").startswith("lorakit."):
                target = node.module[len("lorakit.") :] if node.module != "lorakit" else ""
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}" if target else alias.name
                if full in modules:
                    found.append((full, None, node.lineno))
                    bindings[alias.asname or alias.name] = full
                else:
                    found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "lorakit" or alias.name.startswith("lorakit."):
                    target = alias.name[len("lorakit.") :] if alias.name != "lorakit" else ""
                    found.append((target, None, node.lineno))
                    if alias.asname:
                        bindings[alias.asname] = target
                    else:  # `import lorakit.x.y` binds the name lorakit
                        bindings["lorakit"] = ""
    return found, bindings


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_attributes(tree: ast.AST, bindings: Mapping[str, str], modules: set[str]):
    """Yields (``mod._name`` as written, line) for private attributes read off imported lorakit modules."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, root = [node.attr], node.value
        while isinstance(root, ast.Attribute):
            chain.insert(0, root.attr)
            root = root.value
        if not isinstance(root, ast.Name) or root.id not in bindings:
            continue
        current = bindings[root.id]
        for attr in chain[:-1]:  # walk down through modules; stop at the first non-module
            current = f"{current}.{attr}" if current else attr
            if current not in modules:
                break
        else:
            if _private(chain[-1]) and (f"{current}.{chain[-1]}" if current else chain[-1]) not in modules:
                yield ".".join([root.id, *chain]), node.lineno


def violations(sources: Mapping[str, str], layers: list[str], inference: tuple[str, ...] = INFERENCE) -> list[str]:
    """Every boundary violation in a package given as ``{relative path: source}``."""
    files = {relpath: module_of(relpath) for relpath in sources}
    modules = {name for name, _ in files.values()}

    def rank(module: str) -> int:
        top = module.split(".")[0]
        return len(layers) if module == "" else layers.index(top) if top in layers else -1

    wrong, graph = [], {}
    for relpath, (name, is_pkg) in sorted(files.items()):
        tree = ast.parse(sources[relpath])
        found, bindings = _imports(tree, name, is_pkg, modules)
        graph[name] = {target for target, _, _ in found}
        where = f"lorakit/{relpath}"
        for target, imported_name, line in found:
            if imported_name is not None and _private(imported_name):
                wrong.append(f"{where}:{line}: imports private {imported_name} from lorakit.{target or '__init__'}")
        for text, line in _private_attributes(tree, bindings, modules):
            wrong.append(f"{where}:{line}: reads private {text}")
        if name in ("", "__main__"):
            continue
        if rank(name) < 0:
            wrong.append(f"{where}: {name.split('.')[0]} is not in DESIGN.md's package layout; add it there")
            continue
        for target, _, line in found:
            if rank(target) > rank(name) and target.split(".")[0] != name.split(".")[0]:
                wrong.append(
                    f"{where}:{line}: imports lorakit.{target or '__init__'}, which DESIGN.md's layout puts above it"
                )
    for name in sorted(graph):
        if name.split(".")[0] not in inference:
            continue
        seen, todo = {name: [name]}, [name]
        while todo:
            current = todo.pop()
            for target in sorted(graph.get(current, ())):
                if target.split(".")[0] == "train":
                    chain = " -> ".join(seen[current] + [target])
                    wrong.append(f"lorakit.{name} is inference code but reaches the train package: {chain}")
                elif target not in seen and target != "":
                    seen[target] = seen[current] + [target]
                    todo.append(target)
    return wrong


def tree_sources() -> dict[str, str]:
    return {path.relative_to(SRC).as_posix(): path.read_text() for path in sorted(SRC.rglob("*.py"))}


def test_the_package_keeps_its_boundaries():
    wrong = violations(tree_sources(), LAYERS)
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_the_real_imports():
    assert LAYERS[0] == "errors" and LAYERS[-1] == "cli" and "train" in LAYERS
    modules = {name for name, _ in map(module_of, tree_sources())}
    found, _ = _imports(ast.parse((SRC / "train" / "loop.py").read_text()), "train.loop", False, modules)
    assert {target for target, _, _ in found} >= {"inject", "io", "train.objective", "train.checkpoint"}


LAYOUT = ["errors", "ops", "layers", "train", "runs", "cli"]
GOOD = {
    "__init__.py": "from .ops import fused\nfrom . import train as _pkg\n",
    "errors.py": "",
    "ops.py": "from .errors import Error\n_helper = 1\n",
    "layers.py": "from . import ops\nfrom lorakit.ops import fused\nops.fused(ops.__name__)\n",
    "train/__init__.py": "",
    "train/loop.py": "from ..layers import Lora\nfrom lorakit.train import data\nfrom . import data as d\n",
    "train/data.py": "from lorakit.errors import Error\n",
    "runs.py": "import lorakit.layers\nfrom .ops import fused\nlorakit.layers.Lora\n",
    "cli.py": "def verb():\n    from lorakit import runs, train\n    from lorakit.train.loop import train\n",
}
BAD = {
    "upward": ("layers.py", "from .runs import open_adapter\n", "imports lorakit.runs"),
    "upward absolute, in a function": ("ops.py", "def f():\n    from lorakit.cli import main\n", "lorakit.cli"),
    "upward into a package": ("layers.py", "import lorakit.train.loop\n", "lorakit.train.loop"),
    "whole package": ("ops.py", "import lorakit\n", "lorakit.__init__"),
    "not in the layout": ("quant.py", "from .errors import Error\n", "quant is not in DESIGN.md"),
    "private from relative": ("layers.py", "from .ops import _helper\n", "private _helper from lorakit.ops"),
    "private from absolute": ("runs.py", "from lorakit.ops import fused, _helper\n", "private _helper"),
    "private from a package": ("train/data.py", "from . import _shared\n", "private _shared from lorakit.train"),
    "private attribute": ("layers.py", "from . import ops\nops._helper()\n", "reads private ops._helper"),
    "private attribute, aliased": ("runs.py", "import lorakit.ops as o\no._helper\n", "reads private o._helper"),
    "private attribute, dotted": ("runs.py", "import lorakit\nlorakit.ops._helper\n", "lorakit.ops._helper"),
    "inference imports train": ("runs.py", "from .train.data import load\n", "reaches the train package"),
    "inference reaches train": ("runs.py", "from . import layers\n", "runs -> layers -> train.loop"),
}


def test_the_checker_passes_clean_sources():
    assert violations(GOOD, LAYOUT) == []


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_checker_catches(case):
    path, source, message = BAD[case]
    sources = dict(GOOD)
    if case == "inference reaches train":
        sources["layers.py"] = GOOD["layers.py"] + "def later():\n    from .train import loop\n"
        layout = ["errors", "ops", "train", "layers", "runs", "cli"]  # a legal downward import, yet train
    else:
        layout = LAYOUT
    sources[path] = sources.get(path, "") + source
    wrong = violations(sources, layout)
    assert any(message in w for w in wrong), wrong


# --------------------------------------------------------------------------- at import time


def _run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("first", ["lorakit", "lorakit.train.loop"])
def test_lorakit_train_is_the_function_in_any_import_order(first):
    _run(f"""
import importlib, sys, types
importlib.import_module({first!r})
import lorakit
import lorakit.train.loop
from lorakit.train.loop import train as loop_train
from lorakit.train import data
assert isinstance(lorakit.train, types.FunctionType), lorakit.train
assert sys.modules["lorakit.train"].loop.train is loop_train and data.__name__ == "lorakit.train.data"
import inspect
assert list(inspect.signature(lorakit.train).parameters) == list(inspect.signature(loop_train).parameters)
""")


def test_inference_modules_load_no_training_code():
    mods = ", ".join(f"lorakit.{m}" for m in INFERENCE if (SRC / f"{m}.py").exists() or (SRC / m).is_dir())
    _run(f"""
import sys
import {mods}
loaded = sorted(m for m in sys.modules if m.startswith("lorakit.train."))
assert not loaded, loaded
""")
