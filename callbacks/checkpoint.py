"""The files of a resumable calibration: ``CalibrationCheckpoint`` writes ``last.ckpt`` after every unit and every few
minutes inside long epochs, ``AtomicCheckpointIO`` makes every write atomic. What a checkpoint holds and how it is
read back is ``accuquant_pl/calibration/checkpoint.py``."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from accuquant_pl.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Like ``TorchCheckpointIO``, but a kill during a save never leaves a truncated ``.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class CalibrationCheckpoint(ModelCheckpoint):
    """Keeps ``<dirpath>/last.ckpt`` current during a block-reconstruction ``fit``.

    It is written at the end of every epoch (one reconstruction unit, or the whole-model final stage) and, inside
    an epoch, after the first training step that ends ``every_n_seconds`` after the previous save; a kill loses
    at most that interval or the unit in progress, whichever is shorter. The file is overwritten in place (no
    ``last-v1.ckpt``), so ``--ckpt_path <dirpath>/last.ckpt`` always resumes the newest run written there.

    ``ModelCheckpoint``'s own ``train_time_interval`` is not used: under manual optimisation (which block
    reconstruction uses) Lightning's ``ModelCheckpoint`` saves on train-batch end only by step count.
    """

    def __init__(self, dirpath: str | None = None, every_n_seconds: float | None = 60.0) -> None:
        """
        Args:
            dirpath: folder of ``last.ckpt`` (None: ``<default_root_dir>/checkpoints``, as ``ModelCheckpoint``).
            every_n_seconds: wall-clock seconds between checkpoints inside an epoch; None: only after each epoch.
        """
        if every_n_seconds is not None and every_n_seconds < 0:
            raise ValueError(f"every_n_seconds must be >= 0 (or None), got {every_n_seconds}")
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_epochs=1,
                         save_on_train_epoch_end=True, enable_version_counter=False)
        self.every_n_seconds = every_n_seconds

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, every_n_seconds=self.every_n_seconds)

    def _save_now(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # nothing trained since the last save
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_time_checked = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        if self.every_n_seconds is None:
            return
        epoch_done = getattr(pl_module, "epoch_done", None)
        if callable(epoch_done) and epoch_done(trainer.current_epoch):
            # The epoch's last step: the end-of-epoch save follows. A save here would be resumed by Lightning as
            # a mid-epoch checkpoint of an epoch that has no work left.
            return
        due = time.monotonic() - self._last_time_checked >= self.every_n_seconds
        # Every rank joins the save (trainer.save_checkpoint has a barrier): rank 0's clock decides for all.
        if trainer.strategy.broadcast(due):
            self._save_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        return  # calibration has no validation loop; every save is on the training side
