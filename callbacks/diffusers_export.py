"""Write the trained teacher as a diffusers pipeline folder when ``fit`` ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from diffusers import DDPMPipeline

from accuquant_pl.io import atomic_directory


class ExportDiffusers(L.Callback):
    """Saves ``pl_module.unet`` and ``pl_module.noise_scheduler`` with ``DDPMPipeline.save_pretrained``.

    Runs at ``on_fit_end``, after weight-averaging callbacks (EMA) have copied their average into the model.
    """

    def __init__(self, dirpath: str = "outputs/digits-ddpm") -> None:
        """
        Args:
            dirpath: folder to write (replaced atomically if it exists).
        """
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        pipeline = DDPMPipeline(unet=pl_module.unet, scheduler=pl_module.noise_scheduler)
        with atomic_directory(self.dirpath) as tmp:
            pipeline.save_pretrained(tmp, safe_serialization=True)
