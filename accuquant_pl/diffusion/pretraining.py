"""Train the full-precision DDPM teacher (epsilon prediction) as a LightningModule."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor


class DiffusionPretraining(L.LightningModule):
    """A diffusers ``UNet2DModel`` trained with the DDPM noise-prediction loss."""

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
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        learning_rate: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        val_seed: int = 1234,
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
            num_train_timesteps: diffusion steps of the DDPM forward process.
            beta_schedule: diffusers beta schedule name (linear, scaled_linear, squaredcos_cap_v2).
            learning_rate: peak AdamW learning rate (linear warm-up, then cosine decay to 0 over the run).
            weight_decay: AdamW weight decay.
            warmup_steps: linear warm-up steps.
            val_seed: seed of the fixed noise and timesteps of the validation loss (so runs compare).
        """
        super().__init__()
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
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)

    def _loss(self, images: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        noisy = self.noise_scheduler.add_noise(images, noise, timesteps)
        return F.mse_loss(self.unet(noisy, timesteps).sample, noise)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images = batch[0]
        noise = torch.randn_like(images)
        t = torch.randint(0, self.hparams.num_train_timesteps, (images.shape[0],), device=images.device)
        loss = self._loss(images, noise, t)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images = batch[0]
        gen = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        noise = torch.randn(images.shape, generator=gen).to(images)
        t = torch.randint(0, self.hparams.num_train_timesteps, (images.shape[0],), generator=gen).to(images.device)
        self.log("val/loss", self._loss(images, noise, t), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.learning_rate,
                                weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
