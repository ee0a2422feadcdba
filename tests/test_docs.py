"""Every ``model.init_args.*`` / ``data.init_args.*`` / ``--trainer.*`` key the docs name is one the command line
takes: a renamed argument fails here instead of in a user's pasted command."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import lightning as L
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("models/*/README.md")])
KEY = re.compile(r"(?<![\w.])(?:--)?(model|data)\.init_args\.([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)")
TRAINER_FLAG = re.compile(r"--trainer\.([A-Za-z_]\w*)")


def documented(pattern: re.Pattern[str]) -> list[tuple[str, tuple[str, ...]]]:
    return sorted({(f"{path.relative_to(ROOT)}", match.groups()) for path in DOCS
                   for match in pattern.finditer(path.read_text())})


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def config_classes(section: str) -> list[type]:
    """The LightningModule / DataModule classes the shipped configs use."""
    paths = set()
    for config in ROOT.glob("configs/*.yaml"):
        value = (yaml.safe_load(config.read_text()) or {}).get(section)
        if isinstance(value, dict) and "class_path" in value:
            paths.add(value["class_path"])
    return [_import(path) for path in sorted(paths)]


def _unwrap(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _takes(annotation: Any, parts: list[str]) -> bool:
    """Whether a value of type ``annotation`` has the nested key ``parts`` (dataclass fields, or any dict key)."""
    if not parts:
        return True
    for option in _unwrap(annotation):
        if option is Any or typing.get_origin(option) is dict or option is dict:
            return True
        if dataclasses.is_dataclass(option):
            hints = typing.get_type_hints(option)
            if parts[0] in hints and _takes(hints[parts[0]], parts[1:]):
                return True
    return False


def class_takes(cls: type, key: str) -> bool:
    first, *rest = key.split(".")
    hints = typing.get_type_hints(cls.__init__)
    return first in inspect.signature(cls.__init__).parameters and _takes(hints.get(first, Any), rest)


def test_the_docs_name_config_keys():
    assert len(documented(KEY)) > 10  # the pattern still finds the docs' keys


@pytest.mark.parametrize("where, section, key", [(w, s, k) for w, (s, k) in documented(KEY)])
def test_a_documented_key_is_an_argument(where, section, key):
    classes = config_classes(section)
    assert any(class_takes(cls, key) for cls in classes), (
        f"{where} names {section}.init_args.{key}, which no {section} class of the configs takes "
        f"({', '.join(c.__name__ for c in classes)})")


@pytest.mark.parametrize("where, flag", [(w, f) for w, (f,) in documented(TRAINER_FLAG)])
def test_a_documented_trainer_flag_is_a_trainer_argument(where, flag):
    assert flag in inspect.signature(L.Trainer.__init__).parameters, f"{where} names --trainer.{flag}"


def test_the_checker_refuses_a_renamed_key():
    module = _import("accuquant_pl.calibration.module.BlockReconstruction")
    assert class_takes(module, "final_stage.iterations")
    assert not class_takes(module, "final_stage_iterations")
    assert not class_takes(module, "final_stage.iteration")
