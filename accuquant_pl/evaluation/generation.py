"""Sample images from a diffusers model folder (``predict``): the FP teacher, and later quantized models.

Class- and text-conditional UNets sample with classifier-free guidance; a latent model (a pipeline folder with
``vae/`` or ``vqvae/``) samples latents with the (FP or quantized) UNet and decodes them with the FP autoencoder.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from accuquant_pl.deploy.artifact import exported_scheduler_config, load_quantized
from accuquant_pl.diffusion.conditioning import Conditioning, load_prompt_embeddings
from accuquant_pl.diffusion.loading import load_scheduler_config, load_unet, load_vae
from accuquant_pl.diffusion.sampling import decode_latents, initial_noise, sample
from accuquant_pl.diffusion.schedulers import scheduler_from_config


class DiffusionSampler(L.LightningModule):
    """Generates one image per seed with a diffusers scheduler; ``predict_step`` returns the images."""

    def __init__(
        self,
        pretrained: str = "models/digits-ddpm",
        quantized: str | None = None,
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        eta: float = 0.0,
        class_labels: list[int] | None = None,
        uncond_class_label: int | None = None,
        prompt_embeddings: str | None = None,
        guidance_scale: float = 1.0,
        decode: bool = True,
    ) -> None:
        """
        Args:
            pretrained: local diffusers folder (pipeline folder with unet/ and scheduler/, or a bare UNet folder
                with scheduler_config.json). A latent model's folder also holds vae/ (AutoencoderKL) or vqvae/
                (VQModel).
            quantized: a quantized model folder (``ExportQuantized`` output) to sample from instead of the FP UNet
                (a latent model still decodes with ``pretrained``'s autoencoder).
            scheduler: sampler: ddim, ddpm, dpmsolver++ or euler (built from the folder's scheduler config).
            num_inference_steps: denoising steps.
            eta: DDIM eta (0 = deterministic).
            class_labels: class-conditional models: the sample of seed s gets ``class_labels[s % len]``.
            uncond_class_label: class id used as the unconditional input for classifier-free guidance.
            prompt_embeddings: text-conditional models: a .pt file {'cond': (P, L, D), 'uncond': (L, D)};
                the sample of seed s uses prompt ``s % P``.
            guidance_scale: classifier-free guidance weight s (1.0 = none).
            decode: decode a latent model's samples to images with its autoencoder (False: return latents).
        """
        super().__init__()
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if class_labels is not None and prompt_embeddings is not None:
            raise ValueError("give class_labels or prompt_embeddings, not both")
        if guidance_scale != 1.0 and class_labels is not None and uncond_class_label is None:
            raise ValueError("guidance with class_labels needs uncond_class_label")
        self.save_hyperparameters()
        scheduler_config = None
        if quantized is not None:
            self.unet, scheduler_config = load_quantized(quantized), exported_scheduler_config(quantized)
        else:
            self.unet = load_unet(pretrained)
        self.scheduler = scheduler_from_config(scheduler, scheduler_config or load_scheduler_config(pretrained))
        # A quantized folder holds the UNet only: a latent model decodes with ``pretrained``'s autoencoder (a
        # quantized folder sampled without its FP folder at hand keeps working, without decoding, as before).
        has_fp_folder = quantized is None or Path(pretrained).expanduser().exists()
        self.vae = load_vae(pretrained) if decode and has_fp_folder else None
        self._prompts = load_prompt_embeddings(prompt_embeddings) if prompt_embeddings is not None else None
        if guidance_scale != 1.0 and self._prompts is not None and "uncond" not in self._prompts:
            raise ValueError(f"guidance needs an 'uncond' embedding in {prompt_embeddings!r}")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of the UNet's sample (latents for a latent model)."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def conditioning(self, seeds: Tensor) -> Conditioning | None:
        """The conditioning of the samples of ``seeds`` (None for an unconditional model)."""
        hp = self.hparams
        seeds = seeds.cpu().long()
        if hp.class_labels:
            labels = torch.tensor(hp.class_labels)[seeds % len(hp.class_labels)]
            uncond = None if hp.uncond_class_label is None else torch.full_like(labels, hp.uncond_class_label)
            return Conditioning(class_labels=labels, uncond_class_labels=uncond,
                                guidance_scale=hp.guidance_scale).to(self.device)
        if self._prompts is not None:
            cond = self._prompts["cond"]
            states = cond[seeds % cond.shape[0]]
            uncond = self._prompts.get("uncond")
            uncond = uncond.expand_as(states) if uncond is not None else None
            return Conditioning(encoder_hidden_states=states, uncond_encoder_hidden_states=uncond,
                                guidance_scale=hp.guidance_scale).to(self.device)
        return None

    def generate(self, seeds: Tensor) -> Tensor:
        """The sampler's final states for ``seeds`` (latents for a latent model; see :meth:`decode`)."""
        noise = initial_noise(seeds.tolist(), self.sample_shape).to(self.device)
        return sample(self.unet, self.scheduler, noise, self.hparams.num_inference_steps,
                      cond=self.conditioning(seeds), eta=self.hparams.eta)

    def decode(self, samples: Tensor) -> Tensor:
        """Images from the sampler's final states: the autoencoder's decoding for a latent model, else as is."""
        return decode_latents(self.vae, samples)

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.decode(self.generate(batch)).clamp(-1, 1).cpu()
