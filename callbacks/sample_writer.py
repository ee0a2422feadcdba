"""Write ``predict`` outputs (images in [-1, 1]) as a PNG grid and an ``.npz`` of samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from accuquant_pl.evaluation.images import make_grid, save_png
from accuquant_pl.io import atomic_path


class SampleWriter(BasePredictionWriter):
    """At the end of ``predict``: ``<output_dir>/samples.png`` (grid) and ``samples.npz`` (all images, seeds)."""

    def __init__(self, output_dir: str = "outputs/samples", grid_size: int = 64) -> None:
        """
        Args:
            output_dir: folder for samples.png and samples.npz (one file per rank under DDP).
            grid_size: how many of the samples go into the PNG grid.
        """
        super().__init__(write_interval="epoch")
        self.output_dir, self.grid_size = Path(output_dir), grid_size

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        images = torch.cat(list(batches))
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_png(make_grid(images[: self.grid_size]), self.output_dir / f"samples{suffix}.png")
        with atomic_path(self.output_dir / f"samples{suffix}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images.numpy())
        print(f"wrote {len(images)} samples to {self.output_dir}/samples{suffix}.png and .npz")
