"""Train the full-precision DDPM teachers (epsilon prediction) as LightningModules: the digits UNet and the
class-conditional digits DiT."""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from torch import Tensor, nn

from accuquant_pl.diffusion.conditioning import Conditioning


@dataclass(frozen=True)
class TrainingSchedule:
    """The DDPM forward process and the optimisation of a teacher's pretraining (``--model.init_args.training``)."""

    learning_rate: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 0 over the run)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 200
    """Linear warm-up steps."""
    num_train_timesteps: int = 1000
    """Diffusion steps of the DDPM forward process."""
    beta_schedule: str = "squaredcos_cap_v2"
    """diffusers beta schedule name (linear, scaled_linear, squaredcos_cap_v2)."""
    val_seed: int = 1234
    """Seed of the fixed noise and timesteps of the validation loss (so runs compare)."""

    def __post_init__(self) -> None:
        key = "--model.init_args.training"
        if self.learning_rate <= 0:
            raise ValueError(f"{key}.learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"{key}: weight_decay and warmup_steps must be >= 0, got {self.weight_decay}, "
                             f"{self.warmup_steps}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"{key}.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    def noise_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule)


class NoisePredictionTraining(L.LightningModule):
    """The DDPM noise-prediction loss, the validation loss on fixed noise and the AdamW + cosine schedule shared by
    the teachers, set by one :class:`TrainingSchedule`. A subclass builds ``self.unet`` (the denoiser;
    ``ExportDiffusers`` saves it) and says how the denoiser is called (:meth:`denoise`)."""

    unet: nn.Module

    def __init__(self, training: TrainingSchedule) -> None:
        super().__init__()
        self.schedule = training
        self.noise_scheduler = training.noise_scheduler()

    def denoise(self, noisy: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def sample_conditioning(self, seeds: Tensor) -> Conditioning | None:
        """What the sample of each seed is conditioned on when the teacher samples (None: unconditional)."""
        return None

    def _loss(self, images: Tensor, labels: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        noisy = self.noise_scheduler.add_noise(images, noise, timesteps)
        return F.mse_loss(self.denoise(noisy, timesteps, labels), noise)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        noise = torch.randn_like(images)
        t = torch.randint(0, self.schedule.num_train_timesteps, (images.shape[0],), device=images.device)
        loss = self._loss(images, labels, noise, t)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        gen = torch.Generator().manual_seed(self.schedule.val_seed + batch_idx)
        noise = torch.randn(images.shape, generator=gen).to(images)
        t = torch.randint(0, self.schedule.num_train_timesteps, (images.shape[0],), generator=gen).to(images.device)
        self.log("val/loss", self._loss(images, labels, noise, t), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.schedule.learning_rate,
                                weight_decay=self.schedule.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.schedule.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DiffusionPretraining(NoisePredictionTraining):
    """A diffusers ``UNet2DModel`` (unconditional) trained with the DDPM noise-prediction loss."""

    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 1,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types: tuple[str, ...] = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block: int = 1,
        attention_head_dim: int = 32,
        norm_num_groups: int = 8,
        training: TrainingSchedule = TrainingSchedule(learning_rate=2e-3),
    ) -> None:
        """
        Args:
            sample_size: image side in pixels.
            in_channels: image channels (1 for the digits).
            block_out_channels: channels of each UNet resolution level.
            down_block_types: diffusers down block class names, one per level.
            up_block_types: diffusers up block class names, one per level (deepest first).
            layers_per_block: resnet layers per down block.
            attention_head_dim: channels per attention head in attention blocks.
            norm_num_groups: GroupNorm groups.
            training: the DDPM process and the optimisation (learning rate, warm-up, validation seed).
        """
        super().__init__(training)
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise ValueError(
                f"down_block_types ({len(down_block_types)}) and up_block_types ({len(up_block_types)}) need one "
                f"entry per block_out_channels level ({len(block_out_channels)})"
            )
        self.save_hyperparameters()
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
        )

    def denoise(self, noisy: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
        return self.unet(noisy, timesteps).sample


class DiTPretraining(NoisePredictionTraining):
    """A class-conditional diffusers ``DiTTransformer2DModel`` trained with the DDPM noise-prediction loss.

    Its timestep/class embedding drops the label to the null class (id ``num_classes``) for 10 % of the training
    samples (diffusers' ``LabelEmbedding``), so the teacher also samples with classifier-free guidance."""

    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 1,
        patch_size: int = 2,
        num_layers: int = 6,
        num_attention_heads: int = 4,
        attention_head_dim: int = 24,
        num_classes: int = 10,
        training: TrainingSchedule = TrainingSchedule(),
    ) -> None:
        """
        Args:
            sample_size: image side in pixels (a multiple of patch_size).
            in_channels: image channels (1 for the digits).
            patch_size: side of the square patches that become tokens.
            num_layers: transformer blocks.
            num_attention_heads: attention heads per block.
            attention_head_dim: channels per head (the width is heads x head dim).
            num_classes: class labels; id ``num_classes`` is the unconditional (null) class.
            training: the DDPM process and the optimisation (learning rate, warm-up, validation seed).
        """
        super().__init__(training)
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        self.save_hyperparameters()
        self.unet = DiTTransformer2DModel(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            out_channels=in_channels, num_layers=num_layers, sample_size=sample_size, patch_size=patch_size,
            num_embeds_ada_norm=num_classes, norm_num_groups=1,
        )

    def denoise(self, noisy: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
        return self.unet(noisy, timesteps, class_labels=labels).sample

    def sample_conditioning(self, seeds: Tensor) -> Conditioning | None:
        """Sample i is of class ``i % num_classes`` (the rule of ``ConditioningSpec(class_labels=[0..9])``)."""
        return Conditioning(class_labels=(seeds % self.hparams.num_classes).to(self.device))
