"""Lightning's progress bar, labelled with the reconstruction unit being calibrated."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class UnitProgressBar(TQDMProgressBar):
    """Shows ``unit i/N <name>`` instead of ``Epoch i`` when the module names its epochs (``epoch_names``,
    else ``unit_names``), and counts to the epoch's own iterations (``epoch_iterations``) when it has them."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.train_progress_bar is None:
            return
        e = trainer.current_epoch
        names = getattr(pl_module, "epoch_names", None) or getattr(pl_module, "unit_names", None)
        if names:
            self.train_progress_bar.set_description(f"unit {e + 1}/{len(names)} {names[e]}")
        # The data module yields the longest epoch's batches every epoch (the units stop early when a final
        # stage runs longer), so the loader's length is not this epoch's.
        iterations = getattr(pl_module, "epoch_iterations", None)
        if callable(iterations):
            self.train_progress_bar.total = iterations(e)
            self.train_progress_bar.refresh()
