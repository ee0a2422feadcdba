"""Sample images from a diffusers model folder (``predict``): the FP teacher, and later quantized models.

Class- and text-conditional UNets sample with classifier-free guidance; a latent model (a pipeline folder with
``vae/`` or ``vqvae/``) samples latents with the (FP or quantized) UNet and decodes them with the FP autoencoder.
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from accuquant_pl.deploy.artifact import exported_scheduler_config
from accuquant_pl.deploy.onnx_runtime import load_exported
from accuquant_pl.diffusion.conditioning import Conditioning, ConditioningSpec
from accuquant_pl.diffusion.hub import model_exists
from accuquant_pl.diffusion.loading import load_denoiser, load_scheduler_config, load_vae
from accuquant_pl.diffusion.sampling import decode_latents, sample_seeds
from accuquant_pl.diffusion.schedulers import scheduler_from_config


class SampleGeneration(L.LightningModule):
    """Generates one image per seed with a diffusers scheduler; ``predict_step`` returns the images."""

    def __init__(
        self,
        pretrained: str = "models/digits-ddpm",
        quantized: str | None = None,
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        eta: float = 0.0,
        conditioning: ConditioningSpec | None = None,
        decode: bool = True,
        onnx_threads: int | None = None,
    ) -> None:
        """
        Args:
            pretrained: the FP diffusers model: a folder (pipeline folder with unet/ or transformer/ and
                scheduler/, or a bare denoiser folder with scheduler_config.json) or a Hub id. A latent model's folder also holds vae/ (AutoencoderKL) or vqvae/
                (VQModel).
            quantized: a quantized model folder (``ExportQuantized`` output) to sample from instead of the FP denoiser
                (a latent model still decodes with ``pretrained``'s autoencoder), or its ONNX export
                (``accuquant_pl.export_onnx``), which then runs in ONNX Runtime.
            scheduler: the diffusers scheduler, a name in ``accuquant_pl.diffusion.scheduler_names()`` (built from the
                folder's scheduler config).
            num_inference_steps: denoising steps.
            eta: DDIM eta (0 = deterministic).
            conditioning: conditional models: the class label or prompt of the sample of seed s, and the
                guidance (:class:`~accuquant_pl.diffusion.ConditioningSpec`; None: unconditional).
            decode: decode a latent model's samples to images with its autoencoder (False: return latents).
            onnx_threads: ONNX Runtime's intra-op threads for an ONNX ``quantized`` folder (None: its default).
        """
        super().__init__()
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.save_hyperparameters()
        self.conditioning_spec = ConditioningSpec.of(conditioning)
        self.hparams["conditioning"] = self.conditioning_spec.to_dict() if self.conditioning_spec else None
        if self.conditioning_spec is not None:
            self.conditioning_spec.prompts()  # a missing or malformed prompt file fails here, not mid-sampling
        scheduler_config = None
        if quantized is not None:
            self.unet = load_exported(quantized, onnx_threads=onnx_threads)
            scheduler_config = exported_scheduler_config(quantized)
        else:
            self.unet = load_denoiser(pretrained)
        self.scheduler = scheduler_from_config(scheduler, scheduler_config or load_scheduler_config(pretrained))
        # A quantized folder holds the UNet only: a latent model decodes with ``pretrained``'s autoencoder (a
        # quantized folder sampled without its FP folder at hand keeps working, without decoding, as before).
        has_fp_folder = quantized is None or model_exists(pretrained)
        self.vae = load_vae(pretrained) if decode and has_fp_folder else None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of the UNet's sample (latents for a latent model)."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def conditioning(self, seeds: Tensor) -> Conditioning | None:
        """The conditioning of the samples of ``seeds`` (None for an unconditional model)."""
        spec = self.conditioning_spec
        return spec.for_samples(seeds, self.device) if spec is not None else None

    def generate(self, seeds: Tensor) -> Tensor:
        """The sampler's final states for ``seeds`` (latents for a latent model; see :meth:`decode`)."""
        return sample_seeds(self.unet, self.scheduler, seeds.tolist(), self.sample_shape,
                            self.hparams.num_inference_steps, cond=self.conditioning(seeds), eta=self.hparams.eta,
                            device=self.device)

    def decode(self, samples: Tensor) -> Tensor:
        """Images from the sampler's final states: the autoencoder's decoding for a latent model, else as is."""
        return decode_latents(self.vae, samples)

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.decode(self.generate(batch)).clamp(-1, 1).cpu()
