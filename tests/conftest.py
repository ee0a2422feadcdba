"""Shared fixtures: tiny diffusers models saved as local folders, as a user would bring them."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from callbacks.fid import FIDCallback

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "models" / "digits-ddpm"

# The suite pins one torch (and OpenMP / MKL) thread, for itself and the subprocesses it starts: its models are tiny,
# so a second thread buys little, and on a busy machine it spin-waits for a core it does not get (the suite took
# over 45 min with one other CPU-bound process on 2 cores, under 8 min pinned). Results then also do not depend on
# the machine's core count. The suite's parallelism is its two pytest-xdist workers instead (pyproject addopts).
TEST_THREADS = 1
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(TEST_THREADS)
torch.set_num_threads(TEST_THREADS)


def checkpoint_and_export_callbacks(root: Path, every_n_seconds: float | None = 60.0) -> list[dict]:
    """The YAML callbacks of a resumable calibration: a checkpoint after every unit (and every ``every_n_seconds``
    inside an epoch) and the quantized export."""
    return [
        {"class_path": "callbacks.CalibrationCheckpoint",
         "init_args": {"dirpath": str(root / "checkpoints"), "every_n_seconds": every_n_seconds}},
        {"class_path": "callbacks.ExportQuantized", "init_args": {"dirpath": str(root / "quantized")}},
    ]


def quick_fit_args(tmp_path: Path, config: str, folder: Path, name: str, model: dict, data: dict) -> list[str]:
    """``main.py fit`` arguments: a shipped config, overridden for a seconds-long CPU run of ``folder`` that exports
    to ``tmp_path/name/quantized``; ``model`` and ``data`` add to (or replace) its model and data init_args."""
    root = tmp_path / name
    override = {
        "trainer": {"accelerator": "cpu", "devices": 1, "default_root_dir": str(root), "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False, "enable_checkpointing": False,
                    "callbacks": [{"class_path": "callbacks.ExportQuantized",
                                   "init_args": {"dirpath": str(root / "quantized")}}]},
        "model": {"init_args": {"pretrained": str(folder), "iterations_per_unit": 2, "act_calibration_samples": 8,
                                **model}},
        "data": {"init_args": {"num_trajectories": 4, "batch_size": 2, "cache_dir": str(tmp_path / "cache"), **data}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return ["fit", "--config", str(REPO / "configs" / config), "--config", str(path)]


def fit_with_final_fid(module, datamodule, output_dir: Path, num_inference_steps: int):
    """Calibrate ``module`` with a plain Trainer and an FIDCallback that evaluates only at the end (3 samples from
    seed 5, random-projection features, no real set); returns the callback."""
    callback = FIDCallback(every_n_units=0, num_samples=3, num_inference_steps=num_inference_steps, first_seed=5,
                           features="random-projection", real_dataset=None, stats_cache_dir=None,
                           output_dir=str(output_dir))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, datamodule)
    return callback


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
