"""dvc.yaml's code deps follow the imports: each stage lists exactly the project modules its script
imports (transitively, read from the source without running it), as files or as the folders that
hold them, so editing a module reruns exactly the stages that use it.

A folder may stand for its files only when the stage uses every file in it. Imports inside a
package's ``__getattr__`` (``pipeline.load_quantized``: lazy) run only when that name is used, and are
not followed; a package ``__init__.py`` that holds only its docstring runs no code and need not be
listed. ``DATA`` names the files a module loads by path instead of importing them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from conftest import ROOT

# module file -> the project files it loads by path (lm-eval reads the task folder, local_data.py included)
DATA = {"pipeline/eval/zeroshot.py": ["pipeline/eval/zeroshot_tasks"]}
CODE = ("pipeline", "stages")  # the folders whose files are code deps


def _module_file(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name ``path`` imports (``from a import b`` gives ``a`` and ``a.b``), relative
    imports resolved against ``module``'s package; a ``__getattr__``'s lazy imports left out."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    lazy = {id(node) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for node in ast.walk(f)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def used_files(script: Path) -> set[str]:
    """The repo files (relative paths) a stage script runs: itself, the stage helpers it imports from
    ``stages/``, every ``pipeline`` module and package ``__init__`` on the way, and their ``DATA``."""
    seen: dict[str, Path] = {"__main__": script}
    todo = [("__main__", script)]
    while todo:
        module, path = todo.pop()
        for name in _imported_names(path, module):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                sub = ".".join(parts[:i])
                if sub in seen:
                    continue
                if parts[0] == "pipeline":
                    found = _module_file(sub)
                elif i == 1 and (ROOT / "stages" / f"{sub}.py").is_file():  # stages/_bootstrap.py
                    found = ROOT / "stages" / f"{sub}.py"
                else:
                    found = None
                if found is not None:
                    seen[sub] = found
                    todo.append((sub, found))
    files = {str(p.relative_to(ROOT)) for p in seen.values()}
    for f in list(files):
        for data in DATA.get(f, []):
            files |= _files_in(data)
    return files


def _files_in(folder: str) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def minimal_deps(files: set[str]) -> list[str]:
    """``files``, with each widest folder whose files are all in it written as the folder (and
    docstring-only package ``__init__.py`` files left out)."""
    folders = {str(parent) for f in files for parent in Path(f).parents if str(parent) != "."}
    deps = set(files)
    for folder in sorted(folders, key=lambda d: d.count("/")):  # widest first
        if not any(folder.startswith(d + "/") for d in deps) and _files_in(folder) <= files:
            deps = {d for d in deps if not d.startswith(folder + "/")} | {folder}
    return sorted(d for d in deps if not d.endswith(".py") or not _docstring_only(d))


def _docstring_only(path: str) -> bool:
    body = ast.parse((ROOT / path).read_text()).body
    return Path(path).name == "__init__.py" and len(body) == 1 and isinstance(body[0], ast.Expr)


def _stages() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in spec.items()}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_code_deps_follow_imports():
    problems = []
    for name, stage in _stages().items():
        script = ROOT / stage["cmd"].split()[1]
        used = used_files(script)
        code_deps = [d for d in stage["deps"] if d.split("/")[0] in CODE]
        missing = sorted(f for f in used if not _covered(f, code_deps) and not _docstring_only(f))
        unused = [d for d in code_deps if not any(_covered(f, [d]) for f in used)]
        # a folder stands for its files only if the stage uses all of them: editing any reruns it rightly
        too_wide = [d for d in code_deps if (ROOT / d).is_dir() and not _files_in(d) <= used]
        if missing or unused or too_wide:
            problems.append(f"{name}: missing {missing}, not imported {unused}, folders with unused files {too_wide}; "
                            f"the deps that follow the imports: {minimal_deps(used)}")
    assert not problems, "\n".join(problems)


def test_tools_rerun_no_stage():
    """The ``python -m`` tools are no stage's code: editing one reruns nothing."""
    used = set().union(*(used_files(ROOT / s["cmd"].split()[1]) for s in _stages().values()))
    assert not {f for f in used if f.startswith("pipeline/tools/")}
