"""``main.py fit`` of a shipped config in a subprocess, as a user runs it, with an override YAML: the one launcher of
the benchmarks that calibrate through the command line (main_comparison, behaviour_fingerprint).

The override file (``<root>/override.yaml``) sets the seed, the run's folders (``<root>``, the export in
``<root>/quantized``), no logger and no progress bar, and adds to the config's model and data ``init_args``; the data
module's ``seed`` is the calibration seed and its trajectory cache the repository's ``.cache/trajectories``. The
subprocess runs in the repository root with ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` set to ``threads``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from accuquant_pl.io import atomic_write_text
from benchmarks.common import REPO, TRAJECTORY_CACHE, threads_env

CHECKPOINT_EVERY_N_SECONDS = 60


def fit_override(root: Path, seed: int, model: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
                 resumable: bool = False) -> dict[str, Any]:
    """The override config of one run in ``root``: ``seed`` as ``seed_everything`` and the trajectory seed,
    ``model`` / ``data`` added to the config's ``init_args``, the export in ``root/quantized``; ``resumable`` adds a
    ``CalibrationCheckpoint`` (``root/checkpoints``, also every ``CHECKPOINT_EVERY_N_SECONDS``) before the export."""
    callbacks = [{"class_path": "callbacks.ExportQuantized", "init_args": {"dirpath": str(root / "quantized")}}]
    if resumable:
        callbacks.insert(0, {"class_path": "callbacks.CalibrationCheckpoint",
                             "init_args": {"dirpath": str(root / "checkpoints"),
                                           "every_n_seconds": CHECKPOINT_EVERY_N_SECONDS}})
    return {
        "seed_everything": seed,
        "trainer": {"default_root_dir": str(root), "enable_progress_bar": False, "logger": False,
                    "callbacks": callbacks},
        "model": {"init_args": dict(model or {})},
        "data": {"init_args": {"seed": seed, "cache_dir": str(TRAJECTORY_CACHE), **(data or {})}},
    }


def fit_argv(config: Path, root: Path, extra_configs: Sequence[str] = (), resumable: bool = False) -> list[str]:
    """``main.py`` arguments: ``fit`` of ``config`` composed with ``root/override.yaml`` and ``extra_configs``; a
    ``resumable`` run whose ``root/checkpoints/last.ckpt`` exists resumes from it (``--ckpt_path``)."""
    argv = ["fit", "--config", str(config), "--config", str(root / "override.yaml")]
    for extra in extra_configs:
        argv += ["--config", str(extra)]
    last = root / "checkpoints" / "last.ckpt"
    return argv + (["--ckpt_path", str(last)] if resumable and last.is_file() else [])


def run_fit(config: Path, root: Path, seed: int, threads: int, model: dict[str, Any] | None = None,
            data: dict[str, Any] | None = None, extra_configs: Sequence[str] = (), resumable: bool = False) -> Path:
    """Write ``root/override.yaml`` (``fit_override``) and run ``main.py fit`` (``fit_argv``) in a subprocess with
    ``threads`` OMP / MKL threads; raises ``CalledProcessError`` when it fails. Returns the export folder."""
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "override.yaml", yaml.safe_dump(fit_override(root, seed, model, data, resumable)))
    subprocess.run([sys.executable, str(REPO / "main.py"), *fit_argv(config, root, extra_configs, resumable)],
                   cwd=REPO, env=threads_env(threads), check=True)
    return root / "quantized"
