"""Calibration checkpoints, the one home of what a checkpoint holds besides the state dict and of reading it back.

- the checkpoint section (:func:`progress_section` / :func:`saved_progress`): the units done (hardened), whether
  the final stage finished, the RNG state, the trainer precision, the FP model's pinned source and, for a
  checkpoint written inside an epoch, where in it (:func:`mid_epoch_state`, :func:`resume_epoch_position`);
- the RNG state as plain tensors (:func:`rng_state`), so checkpoints load with ``torch.load(weights_only=True)``;
- ``fit --ckpt_path``: reading the file safely (:func:`read_checkpoint`, a one-line :class:`CheckpointError` for
  anything that is not a calibration checkpoint) and the settings that differ from the requested ones
  (:func:`settings_differences`);
- restoring the finalized student for evaluation (:func:`restore_hyperparameters`, used by
  ``BlockReconstruction.student_from_checkpoint``).

Its users: ``BlockReconstruction``'s checkpoint hooks (``calibration/module.py``), the CLI's resume checks
(``cli.py``), ``SampleEvaluation`` (``evaluation/module.py``) and the callbacks that write the files
(``callbacks/checkpoint.py``).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import random
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from accuquant_pl.diffusion.hub import hub_reference, model_exists
from accuquant_pl.quant import AdaRoundQuantizer
from accuquant_pl.quant.spec import QuantSpec, with_legacy_timesteps

CHECKPOINT_SECTION = "accuquant"
"""The key of the calibration's own state in a checkpoint (done units, RNG, a mid-epoch position)."""


# ----- RNG state -----
def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states, as plain tensors and numbers (the checkpoint loads with
    ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss], "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


# ----- the checkpoint section -----
def progress_section(done_units: list[str], final_stage_done: bool, precision: str,
                     mid_epoch: dict[str, Any] | None, pinned_pretrained: str | None = None) -> dict[str, Any]:
    """The calibration's own section of a checkpoint: units done, final stage done, the RNG state, the trainer
    precision and torch's thread count, the position inside an epoch (None at an epoch's end) and the pinned FP
    model."""
    return {"done_units": list(done_units), "final_stage_done": final_stage_done, "rng": rng_state(),
            "precision": precision,  # compared on resume (a result-changing trainer setting)
            "threads": torch.get_num_threads(),  # compared on resume: float reductions split by thread count
            "mid_epoch": mid_epoch, "pretrained": pinned_pretrained}


def saved_progress(checkpoint: dict[str, Any], section: str, pretrained: str,
                   pinned_pretrained: str | None) -> dict[str, Any]:
    """The checkpoint's ``section`` (written by :func:`progress_section`), refused when it has none or when its FP
    model is not the one loaded now (:func:`check_same_source`)."""
    state = checkpoint.get(section)
    if state is None:
        raise ValueError(f"checkpoint has no {section!r} section: it was not written by BlockReconstruction")
    # ``source_model``: the key's name in checkpoints written before the second layout pass
    check_same_source(state.get("pretrained", state.get("source_model")), pretrained, pinned_pretrained)
    return state


def restore_hardened_units(student: nn.Module, done_units: list[str], unit_names: list[str]) -> None:
    """Give the done units' AdaRound quantizers the hardened structure their saved state has (V dropped), so that
    the checkpoint's state dict loads into ``student``."""
    unknown = [n for n in done_units if n not in unit_names]
    if unknown:
        raise ValueError(f"checkpoint names units {unknown} that this model does not have")
    for name in done_units:
        for q in student.get_submodule(name).modules():
            if isinstance(q, AdaRoundQuantizer) and not q.hardened and not q.is_off:
                q.mark_hardened(tuple(q.alpha.shape))


def mid_epoch_state(section: dict[str, Any], checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The position inside an epoch a checkpoint was written at, with the epoch optimiser's state, or None."""
    mid = section.get("mid_epoch")
    if mid is None or mid["lr_schedule"] is None:
        return mid
    optimizer_states = checkpoint.get("optimizer_states") or []
    if len(optimizer_states) != 1:
        raise ValueError("the checkpoint was written inside an epoch but holds no optimiser state (saved "
                         "weights-only?); resume from a checkpoint saved at the end of a unit")
    return {**mid, "optimizer": optimizer_states[0]}


def resume_epoch_position(state: dict[str, Any], epoch: int, epoch_names: list[str], optimizer: Any,
                          lr_schedule: Any) -> int:
    """Load a mid-epoch checkpoint's optimiser and lr-schedule state into the epoch's fresh ones; return the
    iteration to continue from."""
    if state["epoch"] != epoch:
        raise RuntimeError(f"the checkpoint was written inside epoch {state['epoch']} "
                           f"({epoch_names[state['epoch']]}), but training resumed at epoch {epoch}")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
    return int(state["iteration"])


def check_same_source(recorded: str | None, pretrained: str, pinned_pretrained: str | None) -> None:
    """Refuse a resume whose Hub id now resolves to another commit than the checkpoint recorded (``recorded``; None
    in older checkpoints): the units done were calibrated on the recorded commit's weights, the rest would not be."""
    if recorded is None or hub_reference(pretrained) is None or recorded == pinned_pretrained:
        return
    raise ValueError(f"the checkpoint was calibrated from {recorded!r}, but {pretrained!r} now resolves to "
                     f"{pinned_pretrained!r} (the Hub branch moved), and a run does not continue on other weights; start "
                     f"it again without --ckpt_path, the id pinned: --model.init_args.pretrained {recorded} (the old "
                     f"weights) or {pinned_pretrained} (the new)")


# ----- fit --ckpt_path: reading a checkpoint and comparing its settings -----
DATA_KEYS_WITHOUT_EFFECT = ("cache_dir", "cache_path", "rebuild", "num_workers")
"""Data-module settings that cannot change a calibration's result: where the trajectory cache lives, whether a
mismatching one is rebuilt, and how batches are loaded."""

MODEL_KEYS_WITHOUT_EFFECT = ("model.init_args.final_stage.recompute",)
"""Model settings that cannot change a calibration's result: whether the approx rollout recomputes its step graphs
or keeps them (the same gradient bit for bit, ``rollout_approx``)."""

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
    """Where the class of ``class_path`` is defined: a package export and the defining module name one class, and
    compare equal."""
    if not class_path or "." not in class_path:
        return class_path
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return class_path
    return f"{cls.__module__}.{cls.__qualname__}"


LEGACY_DATA_KEYS = {"teacher": "pretrained"}
"""Data-module settings saved under an earlier name (checkpoints written before the second layout pass)."""


def _current_names(args: dict[str, Any]) -> dict[str, Any]:
    return {LEGACY_DATA_KEYS.get(k, k): v for k, v in args.items()}


def _settings(class_path: str | None, init_args: dict[str, Any], prefix: str,
              ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    args = {k: v for k, v in init_args.items() if k not in (*_PRIVATE_KEYS, "_class_path", *ignore)}
    if prefix == "data":
        args = _current_names(args)
    if isinstance(args.get("quant"), dict):
        args["quant"] = timestep_ranges(args["quant"])
    return {f"{prefix}.class_path": canonical_class_path(class_path), **_flatten(f"{prefix}.init_args", args)}


def _same(a: Any, b: Any) -> bool:
    # JSON round trip: tuples and lists, ints and equal floats compare as the YAML would write them.
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def settings_differences(checkpoint: dict[str, Any], model: dict[str, Any], data: dict[str, Any] | None,
                         precision: str | int | None = None, section: str = CHECKPOINT_SECTION,
                         threads: int | None = None) -> list[str]:
    """``key: checkpoint value -> requested value`` for every setting that changes the result and differs between
    ``checkpoint`` and the requested ``model`` / ``data`` configs (``{'class_path', 'init_args'}``),
    ``trainer.precision`` and ``threads`` (each compared when the checkpoint's ``section`` records it)."""
    saved_model = dict(checkpoint.get("hyper_parameters") or {})
    old = _settings(saved_model.get("_class_path"), saved_model, "model")
    new = _settings(model.get("class_path"), dict(model.get("init_args") or {}), "model")
    for key in MODEL_KEYS_WITHOUT_EFFECT:
        old.pop(key, None)
        new.pop(key, None)
    saved_precision = (checkpoint.get(section) or {}).get("precision")
    if saved_precision is not None:
        old["trainer.precision"], new["trainer.precision"] = saved_precision, unified_precision(precision)
    saved_threads = (checkpoint.get(section) or {}).get("threads")
    if saved_threads is not None and threads is not None:
        old["threads"], new["threads"] = saved_threads, threads
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
    args = _current_names({k: v for k, v in saved.items() if k not in (*_PRIVATE_KEYS, "_class_path")})
    asked = dict(requested.get("init_args") or {})
    return {"class_path": saved.get("_class_path", requested.get("class_path")),
            "init_args": {**args, **{k: asked[k] for k in DATA_KEYS_WITHOUT_EFFECT if k in asked}}}


# ----- the finalized student, for evaluation -----
def is_calibration_checkpoint(checkpoint: dict[str, Any]) -> bool:
    return CHECKPOINT_SECTION in checkpoint and "state_dict" in checkpoint and "hyper_parameters" in checkpoint


def restore_hyperparameters(checkpoint: dict[str, Any], pretrained: str | None = None) -> dict[str, Any]:
    """The ``BlockReconstruction`` arguments that rebuild the student of a calibration ``checkpoint``, checked.

    Args:
        checkpoint: the loaded checkpoint dictionary.
        pretrained: FP model folder to build the structure from, when it moved since calibration.
    """
    if not is_calibration_checkpoint(checkpoint):
        raise ValueError(f"not a calibration checkpoint: it lacks the {CHECKPOINT_SECTION!r}, "
                         "'state_dict' or 'hyper_parameters' section that BlockReconstruction writes")
    hparams = dict(checkpoint["hyper_parameters"])
    if isinstance(hparams.get("quant"), dict):  # a spec written before timestep groups existed: one range
        hparams["quant"] = QuantSpec.from_export(hparams["quant"]).to_dict()
    if pretrained is not None:
        hparams["pretrained"] = pretrained
    if not model_exists(hparams["pretrained"]):
        raise FileNotFoundError(f"the checkpoint's FP model folder {hparams['pretrained']!r} does not exist; "
                                "pass the folder it was calibrated from")
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


@contextmanager
def rng_untouched() -> Iterator[None]:
    """Restore the RNG state on exit: loading a checkpoint restores the calibration's RNG, which an evaluation
    must not see."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
