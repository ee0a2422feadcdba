"""Write the calibrated model as a quantized model folder when ``fit`` ends."""

from __future__ import annotations

import lightning as L

from accuquant_pl.models.loading import load_scheduler_config
from accuquant_pl.quantized_model import export_quantized


class ExportQuantized(L.Callback):
    """Exports ``pl_module.student`` with :func:`accuquant_pl.quantized_model.export_quantized` at ``on_fit_end``."""

    def __init__(self, dirpath: str = "outputs/quantized") -> None:
        """
        Args:
            dirpath: folder to write (replaced atomically).
        """
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            export_quantized(pl_module.finalize(), self.dirpath, pl_module.spec,
                             load_scheduler_config(pl_module.hparams.pretrained))
