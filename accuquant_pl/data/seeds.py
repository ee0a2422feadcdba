"""Seeds as a dataset: each item is one sample's seed, so sampling shards over devices reproducibly."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class SeedDataset(Dataset):
    """Seeds ``first_seed .. first_seed + num_samples - 1``."""

    def __init__(self, num_samples: int, first_seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.first_seed = num_samples, first_seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(self.first_seed + index)


class SeedDataModule(L.LightningDataModule):
    """Seeds of the initial noises to sample from (predict / validate / test)."""

    def __init__(self, num_samples: int = 64, batch_size: int = 64, first_seed: int = 0) -> None:
        """
        Args:
            num_samples: how many images to generate.
            batch_size: images per sampling batch.
            first_seed: seed of the first image; image i uses first_seed + i.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = SeedDataset(num_samples, first_seed)
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()
