"""The package layout's rules (docs/ARCHITECTURE.md): dependencies point one way, files and functions stay small,
and configs name classes by their package exports."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGE = REPO / "accuquant_pl"
DEPENDS = {
    "io": set(),
    "denoisers": set(),
    "host_memory": set(),
    "metrics": {"io"},
    "quant": {"denoisers"},
    "diffusion": {"io", "denoisers"},
    "deploy": {"io", "denoisers", "quant", "diffusion"},
    "data": {"io", "diffusion"},
    "calibration": {"quant", "diffusion", "data"},
    "evaluation": {"io", "metrics", "diffusion", "deploy", "data", "calibration"},
    "cli": {"calibration"},
}
"""What each part of ``accuquant_pl`` imports from the others, exactly (docs/ARCHITECTURE.md): ``io``, the denoiser
registry and ``host_memory`` at the bottom, then {quant, diffusion} -> {deploy, data} -> calibration -> evaluation -> cli, with
``metrics`` beside them for evaluation. An import outside this table fails, and so does an entry no code uses."""
LONGER_FILES = {
    "accuquant_pl/calibration/module.py": "BlockReconstruction's lifecycle: epochs, steps, hardening and checkpoint "
                                          "hooks are one Lightning object; the objectives, rollout and checkpoint "
                                          "contents already live in their own modules",
}
"""Files that may exceed 400 lines because they hold one concept whose split would scatter it."""


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def _package(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_packages(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "accuquant_pl" and len(parts) > 1:
                found.add(parts[1])
    return found


def _dependencies() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in _modules():
        own = _package(path)
        found.setdefault(own, set()).update(other for other in _imported_packages(ast.parse(path.read_text()))
                                            if other != own)
    return found


def test_dependencies_are_exactly_the_declared_shape():
    found = _dependencies()
    undeclared = {part: sorted(found[part] - DEPENDS.get(part, set())) for part in found
                  if found[part] - DEPENDS.get(part, set())}
    unused = {part: sorted(DEPENDS[part] - found.get(part, set())) for part in DEPENDS
              if DEPENDS[part] - found.get(part, set())}
    assert not undeclared and not unused, (undeclared, unused)
    assert set(found) <= set(DEPENDS), sorted(set(found) - set(DEPENDS))


def test_the_package_imports_nothing_from_outside_it():
    outside = ("callbacks", "benchmarks", "tests")
    wrong = [f"{path.relative_to(REPO)} imports {name}" for path in _modules()
             for node in ast.walk(ast.parse(path.read_text()))
             for name in ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else
                          [a.name for a in node.names] if isinstance(node, ast.Import) else [])
             if name.split(".")[0] in outside]
    assert not wrong, wrong


def test_the_declared_shape_has_no_cycle():
    done: set[str] = set()
    while len(done) < len(DEPENDS):
        ready = {part for part, deps in DEPENDS.items() if part not in done and deps <= done}
        assert ready, f"cycle among {sorted(set(DEPENDS) - done)}"
        done |= ready


def test_no_file_over_400_lines_and_no_function_over_60():
    long_files = [f"{p.relative_to(REPO)}: {n}" for p in _modules()
                  if (n := len(p.read_text().splitlines())) > 400
                  and str(p.relative_to(REPO)) not in LONGER_FILES]
    long_functions = [f"{p.relative_to(REPO)}:{node.name}: {node.end_lineno - node.lineno + 1}"
                      for p in _modules() for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                      and node.end_lineno - node.lineno + 1 > 60]
    assert not long_files and not long_functions, (long_files, long_functions)
    stale = [p for p in LONGER_FILES if len((REPO / p).read_text().splitlines()) <= 400]
    assert not stale, f"{stale} no longer need their exception"
    undocumented = [p for p in LONGER_FILES if p not in (REPO / "docs" / "ARCHITECTURE.md").read_text()]
    assert not undocumented


def _class_paths(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return own + [p for v in node.values() for p in _class_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in _class_paths(v)]
    return []


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_configs_name_our_classes_by_their_package_exports(config):
    for class_path in _class_paths(yaml.safe_load((REPO / "configs" / config).read_text())):
        module, _, name = class_path.rpartition(".")
        assert getattr(importlib.import_module(module), name) is not None
        if class_path.startswith(("accuquant_pl.", "callbacks.")):
            assert module.count(".") <= 1, f"{config}: {class_path} is not a package export"
