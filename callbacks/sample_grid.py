"""Log a grid of DDIM samples from the model being trained, to TensorBoard and a PNG."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from diffusers import DDIMScheduler

from accuquant_pl.diffusion.sampling import initial_noise, sample
from accuquant_pl.evaluation.images import make_grid, save_png


class SampleGrid(L.Callback):
    """Samples ``num_samples`` images from fixed seeds after validation and at the end of ``fit``."""

    def __init__(self, num_samples: int = 64, num_inference_steps: int = 50, first_seed: int = 0,
                 filename: str = "samples.png") -> None:
        """
        Args:
            num_samples: images in the grid.
            num_inference_steps: DDIM steps.
            first_seed: seed of the first image's noise.
            filename: PNG written into the logger's folder (or the trainer's root folder).
        """
        self.num_samples, self.steps, self.first_seed, self.filename = num_samples, num_inference_steps, first_seed, filename

    def _grid(self, pl_module: L.LightningModule) -> torch.Tensor:
        unet = pl_module.unet
        scheduler = DDIMScheduler.from_config(pl_module.noise_scheduler.config)
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        seeds = torch.arange(self.first_seed, self.first_seed + self.num_samples)
        noise = initial_noise(seeds.tolist(), shape).to(pl_module.device)
        describe = getattr(pl_module, "sample_conditioning", None)  # a class-conditional teacher's labels
        cond = describe(seeds) if callable(describe) else None
        was_training = unet.training
        unet.eval()
        images = sample(unet, scheduler, noise, self.steps, cond=cond)
        unet.train(was_training)
        return make_grid(images)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        grid = self._grid(pl_module)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("samples", grid, global_step=trainer.global_step)
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        save_png(grid, folder / self.filename)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)
