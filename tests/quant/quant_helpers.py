"""Helpers shared by the quantization tests: tiny diffusers UNets and calibration batches."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet2DModel


def make_unet() -> UNet2DModel:
    """Tiny unconditional UNet with self-attention down/up blocks."""
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
    ).eval()


def make_cond_unet() -> UNet2DConditionModel:
    """Tiny text-conditional UNet with cross attention (Transformer2DModel blocks)."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=4,
    ).eval()


def unet_batches(n: int = 3, batch: int = 4, cond: bool = False, seed: int = 1) -> list[dict]:
    """Forward kwargs for the tiny UNets (random noise-like inputs over all timesteps). Consecutive samples visit the
    four quarters of the 1000 timesteps in turn, so any 4 samples calibrate every default timestep group."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        quarter = (torch.arange(batch) + i * batch) % 4
        b = {"sample": torch.randn(batch, 1, 8, 8, generator=g),
             "timestep": quarter * 250 + torch.randint(0, 250, (batch,), generator=g)}
        if cond:
            b["encoder_hidden_states"] = torch.randn(batch, 5, 8, generator=g)
        out.append(b)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()
