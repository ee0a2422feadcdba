"""A diffusers pipeline around an exported quantized model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accuquant_pl.deploy.artifact import SCHEDULER_CONFIG, exported_scheduler_config, load_quantized


def quantized_pipeline(folder: str | Path, scheduler: str = "ddim", execution: str = "dequant") -> Any:
    """A diffusers ``DDIMPipeline`` (``scheduler="ddim"``) or ``DDPMPipeline`` (``"ddpm"``) around the quantized
    ``UNet2DModel`` of ``folder``, its scheduler built from the saved scheduler config.

    Conditional UNets need the rest of their pipeline (VAE, text encoder): pass ``load_quantized(folder)`` as
    ``unet=`` to that pipeline instead.
    """
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    kinds = {"ddim": (DDIMPipeline, DDIMScheduler), "ddpm": (DDPMPipeline, DDPMScheduler)}
    if scheduler not in kinds:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(kinds)}")
    unet = load_quantized(folder, execution)
    if not isinstance(unet, UNet2DModel):
        raise TypeError(f"{folder} holds a {type(unet).__name__}; pass load_quantized(folder) as the unet of "
                        "its own pipeline (it needs a VAE / text encoder this folder does not have)")
    scheduler_config = exported_scheduler_config(folder)
    if scheduler_config is None:
        raise FileNotFoundError(f"quantized model folder {str(folder)!r} has no {SCHEDULER_CONFIG}")
    pipeline_cls, scheduler_cls = kinds[scheduler]
    return pipeline_cls(unet=unet, scheduler=scheduler_cls.from_config(scheduler_config))
