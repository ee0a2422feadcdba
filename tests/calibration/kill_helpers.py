"""Test-only pieces a killed calibration subprocess loads by class path (``python main.py`` puts the repo on
``sys.path``): a pace for the training loop and a checkpoint writer that stalls inside one save."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins import TorchCheckpointIO

from accuquant_pl.io import atomic_path
from callbacks.checkpoint import AtomicCheckpointIO


class Pace(L.Callback):
    """Sleeps after every training step, so that a watcher can kill the run at a chosen point; it changes no
    number the run computes."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(self.seconds)


class StallingCheckpointIO(AtomicCheckpointIO):
    """``AtomicCheckpointIO`` whose save number ``stall_at`` writes its temp file completely, touches ``marker``
    and then waits (for the kill) before the rename: the window a kill during a checkpoint write lands in."""

    def __init__(self, stall_at: int, marker: str) -> None:
        super().__init__()
        self.stall_at, self.marker, self.saves = stall_at, Path(marker), 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.saves += 1
        if self.saves != self.stall_at:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as tmp:
            TorchCheckpointIO.save_checkpoint(self, checkpoint, tmp, storage_options)
            self.marker.touch()
            time.sleep(600)
