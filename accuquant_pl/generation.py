"""Sample images from a diffusers model folder (``predict``): the FP teacher, and later quantized models."""

from __future__ import annotations

import lightning as L
from torch import Tensor

from accuquant_pl.models.loading import load_scheduler_config, load_unet, scheduler_from_config
from accuquant_pl.quantized_model import load_quantized_model
from accuquant_pl.sampling import initial_noise, sample


class DiffusionSampler(L.LightningModule):
    """Generates one image per seed with a diffusers scheduler; ``predict_step`` returns the images."""

    def __init__(
        self,
        pretrained: str = "models/digits-ddpm",
        quantized: str | None = None,
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        eta: float = 0.0,
    ) -> None:
        """
        Args:
            pretrained: local diffusers folder (pipeline folder with unet/ and scheduler/, or a bare UNet folder
                with scheduler_config.json).
            quantized: a quantized model folder (``ExportQuantized`` output) to sample from instead of the FP UNet.
            scheduler: sampler: ddim, ddpm, dpmsolver++ or euler (built from the folder's scheduler config).
            num_inference_steps: denoising steps.
            eta: DDIM eta (0 = deterministic).
        """
        super().__init__()
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.save_hyperparameters()
        scheduler_config = None
        if quantized is not None:
            self.unet, scheduler_config = load_quantized_model(quantized)
        else:
            self.unet = load_unet(pretrained)
        self.scheduler = scheduler_from_config(scheduler, scheduler_config or load_scheduler_config(pretrained))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def generate(self, seeds: Tensor) -> Tensor:
        noise = initial_noise(seeds.tolist(), self.sample_shape).to(self.device)
        return sample(self.unet, self.scheduler, noise, self.hparams.num_inference_steps, eta=self.hparams.eta)

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.generate(batch).clamp(-1, 1).cpu()
