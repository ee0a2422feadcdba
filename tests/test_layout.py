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
# A package may import only from packages of a lower rank (io and metrics depend on nothing of ours).
RANK = {"io": 0, "metrics": 1, "diffusion": 1, "quant": 2, "deploy": 3, "data": 4, "calibration": 5,
        "evaluation": 6, "cli": 7}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "_moved.py" and p != PACKAGE / "__init__.py")


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


def test_dependencies_point_one_way():
    wrong = []
    for path in _modules():
        own = _package(path)
        for other in _imported_packages(ast.parse(path.read_text())):
            if other != own and RANK[other] >= RANK[own]:
                wrong.append(f"{path.relative_to(REPO)} imports accuquant_pl.{other}")
    assert not wrong, wrong


def test_no_file_over_400_lines_and_no_function_over_60():
    long_files = [f"{p.relative_to(REPO)}: {n}" for p in _modules()
                  if (n := len(p.read_text().splitlines())) > 400]
    long_functions = [f"{p.relative_to(REPO)}:{node.name}: {node.end_lineno - node.lineno + 1}"
                      for p in _modules() for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                      and node.end_lineno - node.lineno + 1 > 60]
    assert not long_files and not long_functions, (long_files, long_functions)


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


def test_an_old_module_path_still_resolves_with_a_warning_naming_the_new_one():
    import sys

    sys.modules.pop("accuquant_pl.evaluate", None)
    with pytest.warns(FutureWarning, match="accuquant_pl.evaluate is now accuquant_pl.evaluation.module"):
        old = importlib.import_module("accuquant_pl.evaluate")
    from accuquant_pl.evaluation import SampleEvaluation

    assert old.SampleEvaluation is SampleEvaluation
