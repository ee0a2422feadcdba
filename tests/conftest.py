"""Shared fixtures: tiny diffusers models saved as local folders, as a user would bring them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "models" / "digits-ddpm"


def checkpoint_and_export_callbacks(root: Path, every_n_seconds: float | None = 60.0) -> list[dict]:
    """The YAML callbacks of a resumable calibration: a checkpoint after every unit (and every ``every_n_seconds``
    inside an epoch) and the quantized export."""
    return [
        {"class_path": "callbacks.CalibrationCheckpoint",
         "init_args": {"dirpath": str(root / "checkpoints"), "every_n_seconds": every_n_seconds}},
        {"class_path": "callbacks.ExportQuantized", "init_args": {"dirpath": str(root / "quantized")}},
    ]


def tiny_unet(sample_size: int = 8, seed: int = 0) -> UNet2DModel:
    """A ~20k-parameter UNet2DModel with one attention level: the shape of the teacher, in miniature."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
    )


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A diffusers pipeline folder (unet/ + scheduler/) holding a tiny random UNet."""
    folder = tmp_path / "tiny-ddpm"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests that seed or change torch globals must not leak into each other."""
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    yield
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)
