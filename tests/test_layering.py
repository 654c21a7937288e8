"""Data flows one way (STYLE.md): a module imports only lorakit modules to its left."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
ORDER = ["errors", "config", "ops", "losses", "swiglu", "layers", "fusion", "inject", "adapters", "io", "models",
         "train", "generation", "runs", "export", "cli"]


def rank(module: str) -> int:
    return ORDER.index(module.split(".")[0])


def imported(path: Path) -> set[str]:
    """lorakit modules imported by a file, as dotted names relative to the package."""
    pkg = path.relative_to(SRC).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[: len(pkg) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("lorakit"):
                parts = node.module.split(".")[1:]
            else:
                continue
            if not parts:  # `from . import x` / `from lorakit import x`
                parts = [node.names[0].name]
            out.add(".".join(parts))
    return out


def test_imports_point_left():
    wrong = []
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        if name in ("__init__", "__main__"):
            continue
        for target in imported(path):
            if rank(target) > rank(name):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong
    assert imported(SRC / "train" / "loop.py") >= {"inject", "io", "models", "train.data", "train.checkpoint"}
