"""Every ``model.init_args.*`` / ``data.init_args.*`` / ``--trainer.*`` key the docs name is one the command line
takes: a renamed argument fails here instead of in a user's pasted command. Every repository path named in the
docs, configs, docstrings and comments exists: a moved file fails here instead of sending a reader nowhere."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import shutil
import subprocess
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


# ----- repository paths named in docs, configs, docstrings and comments -----
TOP_FOLDERS = ("accuquant_pl", "callbacks", "benchmarks", "tests", "configs", "docs", "tools", "models", ".ci")
SUBPACKAGES = ("calibration", "data", "deploy", "diffusion", "evaluation", "metrics", "quant")
"""Short forms: ``calibration/rollout.py`` names ``accuquant_pl/calibration/rollout.py``."""
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOP_FOLDERS + SUBPACKAGES)
                  + r")/[^\s`'\"()\],;:]*)")
RETIRED = {"benchmarks/quality.py": "2b51bb5", "benchmarks/make_results.py": "2b51bb5"}
"""Files the docs name as retired, with the commit that still has them (docs/results_128_seeds.md's source)."""


def _texts() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "main.py", ROOT / ".ci" / "run", ROOT / "benchmarks" / "run_all.sh",
             *DOCS, ROOT / "benchmarks" / "README.md", *ROOT.glob("configs/*.yaml")]
    for folder in ("accuquant_pl", "callbacks", "benchmarks", "tests", "tools"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return sorted(set(files) - {Path(__file__).resolve()})  # this file names missing paths on purpose


def named_paths(text: str) -> list[str]:
    """The repository paths a text names (templates such as ``configs/digits_<bits>.yaml`` and regexes skipped)."""
    found = []
    for match in PATH.finditer(text):
        token = match.group(1).split("#")[0].rstrip(".")
        if not any(c in token for c in "<>{}*[]$\\"):
            found.append(token)
    return found


def _exists(token: str) -> bool:
    head, _, rest = token.partition("/")
    if head == "models" and not (ROOT / "models" / rest.split("/")[0]).exists():
        return True  # a user's own download (models/my-sd, models/ddpm-cifar10-32): only shipped models are checked
    if head == "data" and not token.endswith(".py"):
        return True  # a user's data file (data/prompts.pt); data/*.py is the subpackage
    return (ROOT / token).exists() or (head in SUBPACKAGES and (ROOT / "accuquant_pl" / token).exists())


def test_every_repository_path_named_in_docs_and_code_exists():
    missing = [f"{path.relative_to(ROOT)}:{i}: {token}" for path in _texts()
               for i, line in enumerate(path.read_text().splitlines(), 1) for token in named_paths(line)
               if token not in RETIRED and not _exists(token)]
    assert not missing, missing


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="needs the git history")
@pytest.mark.parametrize("path,commit", sorted(RETIRED.items()))
def test_a_retired_path_is_gone_and_in_the_commit_named(path, commit):
    assert not (ROOT / path).exists()
    assert subprocess.run(["git", "cat-file", "-e", f"{commit}:{path}"], cwd=ROOT).returncode == 0


DOTTED = re.compile(r"(?<![\w./-])((?:accuquant_pl|benchmarks)(?:\.[A-Za-z_]\w*)+|callbacks\.[A-Z]\w*)")


def resolves(name: str) -> bool:
    """Whether a dotted name is a module, or an attribute of the longest importable module prefix."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return False
        return True
    return False


def test_every_dotted_name_in_docs_and_code_resolves():
    missing = sorted({f"{path.relative_to(ROOT)}:{i}: {m.group(1)}" for path in _texts()
                      for i, line in enumerate(path.read_text().splitlines(), 1) for m in DOTTED.finditer(line)
                      if not resolves(m.group(1))})
    assert not missing, missing
    assert not resolves("accuquant_pl.diffusion.schedulers.SamplerSteps")


def test_the_path_checker_finds_a_moved_file():
    assert named_paths("see `calibration/scheduler_state.py` and docs/METHOD.md.") == [
        "calibration/scheduler_state.py", "docs/METHOD.md"]
    assert not _exists("calibration/scheduler_state.py") and _exists("calibration/rollout.py")
