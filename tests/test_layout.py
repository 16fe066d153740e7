"""The library's layering: a package imports only from packages below it (README "Map of the code")."""
from __future__ import annotations

import ast

from conftest import ROOT

LAYERS = ["infra", "model", "rotation", "quant", "surgery", "methods", "train", "export", "eval", "fuse", "steps",
          "tools"]


def _imports(path, parts: list[str]) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                out.append(".".join(parts[: len(parts) - node.level] + ([node.module] if node.module else [])))
            elif node.module:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m.startswith("pipeline.")]


def test_no_import_runs_back_up():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        mine = parts[1] if len(parts) > 1 else None
        assert mine in rank or mine == "__init__", f"{path}: a module outside the role packages"
        for target in _imports(path, parts):
            theirs = target.split(".")[1]
            if mine in rank and theirs in rank and rank[theirs] > rank[mine]:
                upward.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not upward, upward
