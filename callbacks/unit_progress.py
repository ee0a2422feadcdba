"""Lightning's progress bar, labelled with the reconstruction unit being calibrated."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class UnitProgressBar(TQDMProgressBar):
    """Shows ``unit i/N <name>`` instead of ``Epoch i`` when the module names its epochs (``epoch_names``,
    else ``unit_names``)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        names = getattr(pl_module, "epoch_names", None) or getattr(pl_module, "unit_names", None)
        if names and self.train_progress_bar is not None:
            e = trainer.current_epoch
            self.train_progress_bar.set_description(f"unit {e + 1}/{len(names)} {names[e]}")
