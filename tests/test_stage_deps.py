"""Each DVC stage lists, as deps, exactly the source files its command imports (read from the code, not by hand).

A stage's command is ``fluent-reward <name>``: its entry point is ``cmd_<name>`` in cli.py. From there every
``fluent_reward`` import (module level or inside functions, relative imports included; ``TYPE_CHECKING`` blocks
excluded) is followed transitively over ``src/fluent_reward``. A module inside a package folder
(``src/fluent_reward/judge/``) is covered by the folder as one dep. cli.py itself and the package ``__init__`` are thin
wiring and deliberately not deps: adding a subcommand must not re-judge or retrain.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "fluent_reward"
NOT_DEPS = {f"src/{PACKAGE}/cli.py", f"src/{PACKAGE}/__init__.py"}


PIPELINES = ("dvc.yaml", "cv/dvc.yaml")  # every pipeline file; their stages run from the repository root (wdir)


def _stages() -> dict:
    stages = {}
    for pipeline in PIPELINES:
        stages.update(yaml.safe_load((ROOT / pipeline).read_text(encoding="utf-8"))["stages"])
    return stages


def _module_file(module: str) -> Path | None:
    """The source of a dotted module under src/ (a module file or a package's __init__), None when not ours."""
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _walk_runtime(node: ast.AST):
    """ast.walk that skips ``if TYPE_CHECKING:`` bodies (imports there never run)."""
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            for orelse in child.orelse:
                yield orelse
                yield from _walk_runtime(orelse)
            continue
        yield child
        yield from _walk_runtime(child)


def _imports(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names of our modules imported anywhere under ``node`` (``from x import y``: x.y when y is a module)."""
    found: set[str] = set()
    for item in _walk_runtime(node):
        if isinstance(item, ast.Import):
            names = [alias.name for alias in item.names]
        elif isinstance(item, ast.ImportFrom):
            if item.level:  # relative: resolve against this module's package
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (item.level - 1)]
                base = ".".join([*parts, *([item.module] if item.module else [])])
            else:
                base = item.module or ""
            names = [base, *(f"{base}.{alias.name}" for alias in item.names)]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] == PACKAGE and _module_file(name))
    return found


def _closure(start: set[str]) -> set[Path]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        todo.extend(_imports(tree, module, path.name == "__init__.py") - seen)
        if path.name == "__init__.py" and module != PACKAGE:
            # a package folder is one dep: every module in it counts (its __init__ may import lazily)
            todo.extend(f"{module}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__")
    return {_module_file(m) for m in seen}


def _entry_point(subcommand: str) -> ast.FunctionDef:
    tree = ast.parse((SRC / PACKAGE / "cli.py").read_text(encoding="utf-8"))
    name = "cmd_" + subcommand.replace("-", "_")
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"cli.py has no {name}() for the stage command `fluent-reward {subcommand}`")


def required_deps(stage: dict) -> set[str]:
    """The repository paths a stage's command runs: files, or package folders as a whole."""
    subcommand = stage["cmd"].split()[1]
    cli_tree = ast.parse((SRC / PACKAGE / "cli.py").read_text(encoding="utf-8"))
    module_level = ast.Module(body=[n for n in cli_tree.body if isinstance(n, ast.Import | ast.ImportFrom)])
    start = _imports(_entry_point(subcommand), f"{PACKAGE}.cli", False) | _imports(
        module_level, f"{PACKAGE}.cli", False
    )
    deps = set()
    for path in _closure(start):
        relative = path.relative_to(ROOT)
        package_dir = relative.parent
        deps.add(str(package_dir) if package_dir != Path("src", PACKAGE) else str(relative))
    return deps - NOT_DEPS


@pytest.mark.parametrize("name", list(_stages()))
def test_stage_deps_are_exactly_the_code_it_imports(name):
    stage = _stages()[name]
    listed = {dep for dep in stage.get("deps", []) if str(dep).startswith("src/")}
    required = required_deps(stage)
    missing = sorted(required - listed)
    assert not missing, f"dvc.yaml stage {name} misses deps (an edit there would not rerun it): {missing}"
    extra = sorted(listed - required)
    assert not extra, f"dvc.yaml stage {name} lists code it never imports (needless reruns): {extra}"


def test_the_import_walk_sees_lazy_relative_and_package_imports(tmp_path, monkeypatch):
    """The walker on a synthetic package: function-level, relative and package-folder imports all count."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fluent_reward import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fluent_reward import c\n")
    (pkg / "c.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "x.py").write_text("from .y import z\nfrom ..c import q\n")
    (pkg / "sub" / "y.py").write_text("z = 1\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in _closure({f"{PACKAGE}.a"})}
    assert names == {f"{PACKAGE}/{n}" for n in ("__init__.py", "a.py", "b.py")}  # c only under TYPE_CHECKING
    names = {p.relative_to(tmp_path).as_posix() for p in _closure({f"{PACKAGE}.sub"})}
    assert names == {f"{PACKAGE}/{n}" for n in ("sub/__init__.py", "sub/x.py", "sub/y.py", "c.py")}
