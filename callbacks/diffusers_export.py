"""Write the trained teacher as a diffusers pipeline folder when ``fit`` ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from diffusers import DDPMPipeline, UNet2DModel

from accuquant_pl.io import atomic_directory


class ExportDiffusers(L.Callback):
    """Saves ``pl_module.unet`` and ``pl_module.noise_scheduler`` with ``DDPMPipeline.save_pretrained`` (a UNet), or
    as ``transformer/`` and ``scheduler/`` folders (a DiT).

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
        with atomic_directory(self.dirpath) as tmp:
            if isinstance(pl_module.unet, UNet2DModel):
                DDPMPipeline(unet=pl_module.unet, scheduler=pl_module.noise_scheduler).save_pretrained(
                    tmp, safe_serialization=True)
            else:  # a pixel-space transformer has no diffusers pipeline class: its component folders
                pl_module.unet.save_pretrained(Path(tmp) / "transformer", safe_serialization=True)
                pl_module.noise_scheduler.save_pretrained(Path(tmp) / "scheduler")
