"""scikit-learn's handwritten digits (1797 real 8x8 images), upsampled, as a LightningDataModule."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

SPLITS = ("train", "heldout", "all")


def digits_tensors(image_size: int = 16, split: str = "all", heldout_fraction: float = 0.15, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images (N, 1, image_size, image_size) in [-1, 1] and labels (N,) of one split.

    The held-out split is a fixed seeded permutation, so evaluation never sees training images.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {SPLITS}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).clamp(-1.0, 1.0)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    if split == "all":
        return images, labels
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_heldout = round(len(images) * heldout_fraction)
    index = order[:n_heldout] if split == "heldout" else order[n_heldout:]
    return images[index], labels[index]


class DigitsDataModule(L.LightningDataModule):
    """Real handwritten digits for training the FP teacher; the held-out split is the validation set."""

    def __init__(
        self,
        batch_size: int = 128,
        image_size: int = 16,
        heldout_fraction: float = 0.15,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            batch_size: images per training batch.
            image_size: side of the square images after bilinear upsampling from 8x8.
            heldout_fraction: fraction of the 1797 digits kept out of training, for evaluation.
            split_seed: seed of the fixed train / held-out permutation.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.train_set = TensorDataset(*digits_tensors(hp.image_size, "train", hp.heldout_fraction, hp.split_seed))
        self.val_set = TensorDataset(*digits_tensors(hp.image_size, "heldout", hp.heldout_fraction, hp.split_seed))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
