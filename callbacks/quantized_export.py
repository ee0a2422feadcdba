"""Write the calibrated model as a deployable quantized model folder (packed integer weights) when ``fit`` ends."""

from __future__ import annotations

import lightning as L

from accuquant_pl.deploy.artifact import export_quantized
from accuquant_pl.diffusion.loading import load_scheduler_config


class ExportQuantized(L.Callback):
    """Exports ``pl_module.student`` with :func:`accuquant_pl.deploy.artifact.export_quantized` at ``on_fit_end``.

    The folder holds integer weights (int4 packed two per byte, or int8), per-channel scales and zero points,
    the activation quantizers, the quantization map and the scheduler config; load it with
    ``accuquant_pl.load_quantized(dirpath)`` (a drop-in diffusers ``unet``) or ``predict --model.init_args.quantized``.
    """

    def __init__(self, dirpath: str = "outputs/quantized") -> None:
        """
        Args:
            dirpath: folder to write (replaced atomically).
        """
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pretrained = pl_module.hparams.pretrained
            settings = getattr(trainer.datamodule, "sampler_settings", None)  # a user's own data module may lack it
            # pinned_pretrained: pretrained as the module loaded it, a Hub id pinned to the commit its weights came from
            export_quantized(pl_module.finalize(), self.dirpath, pl_module.spec, load_scheduler_config(pretrained),
                             pretrained=pl_module.pinned_pretrained, sampler=settings() if callable(settings) else None)
