"""A CheckpointIO that writes every checkpoint to a temporary file and renames it into place."""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO

from accuquant_pl.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Like ``TorchCheckpointIO``, but a kill during a save never leaves a truncated ``.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
