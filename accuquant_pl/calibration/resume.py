"""Resuming a calibration: read a ``--ckpt_path`` safely and compare its settings with the ones asked for."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from accuquant_pl.quant.spec import QuantSpec, with_legacy_timesteps

DATA_KEYS_WITHOUT_EFFECT = ("cache_dir", "cache_path", "rebuild", "num_workers")
"""Data-module settings that cannot change a calibration's result: where the trajectory cache lives, whether a
mismatching one is rebuilt, and how batches are loaded."""

_PRIVATE_KEYS = ("_instantiator",)  # LightningCLI's bookkeeping in saved hyperparameters

LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc")
"""``--ckpt_path`` values that Lightning resolves itself (no file to read here)."""


class CheckpointError(ValueError):
    """A ``--ckpt_path`` that cannot be resumed from: not a checkpoint, not a calibration's, or other settings."""


def is_file_path(ckpt_path: str | os.PathLike) -> bool:
    """False for the names Lightning resolves itself (``last``, ``best``, ``hpc``, ``registry``, ``registry:...``)."""
    text = str(ckpt_path)
    return text not in (*LIGHTNING_CKPT_ALIASES, "registry") and not text.startswith("registry:")


def unified_precision(value: str | int | None) -> str:
    """Lightning's name of a ``trainer.precision`` setting (``32`` and None -> ``'32-true'``, ``bf16`` ->
    ``'bf16-mixed'``, ...), as ``trainer.precision`` reports it."""
    text = "32" if value is None else str(value)
    return {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(text, text)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict at ``path``; a missing file or a file that is not a Lightning checkpoint raises
    :class:`CheckpointError` with one line naming the path and what was expected."""
    path = Path(path)
    expected = "a Lightning .ckpt file written by `fit` (e.g. runs/<name>/checkpoints/last.ckpt)"
    if not path.exists():
        raise CheckpointError(f"--ckpt_path {str(path)!r} does not exist; expected {expected}")
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path {str(path)!r} is a folder; expected {expected}")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"--ckpt_path {str(path)!r} is not a checkpoint (not a complete torch.save archive: "
                              "truncated, or another kind of file); "
                              f"expected {expected}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL (\S+)", str(err))
        if refused is None:
            raise CheckpointError(f"--ckpt_path {str(path)!r} is a damaged or foreign torch file (torch.load: "
                                  f"UnpicklingError); expected {expected}") from err
        raise CheckpointError(f"--ckpt_path {str(path)!r} holds a pickled {refused.group(1)}, which a safe load "
                              "(torch.load weights_only=True) refuses; it was written by another program or an "
                              "older version: start a new run") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError, UnicodeDecodeError,
            AttributeError) as err:
        raise CheckpointError(f"--ckpt_path {str(path)!r} is a damaged or foreign torch file (torch.load: "
                              f"{type(err).__name__}); expected {expected}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise CheckpointError(f"--ckpt_path {str(path)!r} holds a {type(checkpoint).__name__} without Lightning's "
                              f"'state_dict' and 'loops'; expected {expected}")
    return checkpoint


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(f"{prefix}.{key}", sub))
        return out
    return {prefix: value}


def timestep_ranges(quant: dict[str, Any]) -> dict[str, Any]:
    """``quant`` with its two timestep keys replaced by what they mean, so equal settings compare equal: a spec
    written before timestep groups existed (neither key) and ``act_timestep_groups: 1`` both mean one range."""
    quant = dict(with_legacy_timesteps(quant))
    groups = quant.pop("act_timestep_groups", QuantSpec.act_timestep_groups)
    boundaries = quant.pop("act_timestep_boundaries", None)
    if boundaries is None:
        boundaries = [] if groups == 1 else f"{groups} equal groups of the training timesteps"
    return {**quant, "act_timestep_boundaries": boundaries}


def canonical_class_path(class_path: str | None) -> str | None:
    """Where the class of ``class_path`` is defined: a package export, a module alias kept for one release and the
    defining module all name one class, and compare equal."""
    if not class_path or "." not in class_path:
        return class_path
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return class_path
    return f"{cls.__module__}.{cls.__qualname__}"


def _settings(class_path: str | None, init_args: dict[str, Any], prefix: str,
              ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    args = {k: v for k, v in init_args.items() if k not in (*_PRIVATE_KEYS, "_class_path", *ignore)}
    if isinstance(args.get("quant"), dict):
        args["quant"] = timestep_ranges(args["quant"])
    return {f"{prefix}.class_path": canonical_class_path(class_path), **_flatten(f"{prefix}.init_args", args)}


def _same(a: Any, b: Any) -> bool:
    # JSON round trip: tuples and lists, ints and equal floats compare as the YAML would write them.
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def settings_differences(checkpoint: dict[str, Any], model: dict[str, Any], data: dict[str, Any] | None,
                         precision: str | int | None = None, section: str = "accuquant") -> list[str]:
    """``key: checkpoint value -> requested value`` for every setting that changes the result and differs between
    ``checkpoint`` and the requested ``model`` / ``data`` configs (``{'class_path', 'init_args'}``) and
    ``trainer.precision`` (compared when the checkpoint's ``section`` records one)."""
    saved_model = dict(checkpoint.get("hyper_parameters") or {})
    old = _settings(saved_model.get("_class_path"), saved_model, "model")
    new = _settings(model.get("class_path"), dict(model.get("init_args") or {}), "model")
    saved_precision = (checkpoint.get(section) or {}).get("precision")
    if saved_precision is not None:
        old["trainer.precision"], new["trainer.precision"] = saved_precision, unified_precision(precision)
    saved_data = checkpoint.get("datamodule_hyper_parameters")
    if saved_data is not None and data is not None:
        old.update(_settings(saved_data.get("_class_path"), saved_data, "data", DATA_KEYS_WITHOUT_EFFECT))
        new.update(_settings(data.get("class_path"), dict(data.get("init_args") or {}), "data",
                             DATA_KEYS_WITHOUT_EFFECT))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if not _same(old.get(key), new.get(key))]


def checkpoint_data_config(checkpoint: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    """The data module config (``{'class_path', 'init_args'}``) to resume with under ``use_checkpoint_config``: the
    checkpoint's, with the requested values of the settings that cannot change the result (cache, workers)."""
    saved = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    args = {k: v for k, v in saved.items() if k not in (*_PRIVATE_KEYS, "_class_path")}
    asked = dict(requested.get("init_args") or {})
    return {"class_path": saved.get("_class_path", requested.get("class_path")),
            "init_args": {**args, **{k: asked[k] for k in DATA_KEYS_WITHOUT_EFFECT if k in asked}}}
