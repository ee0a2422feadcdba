"""Calibration statistics aggregated over many batches: running min/max and a bounded value sample."""

from __future__ import annotations

import torch


class TensorObserver:
    """Statistics of a stream of ``[n, C]`` row blocks.

    ``min_val``/``max_val`` are exact running extremes per column. ``samples`` is a bounded
    (``max_rows``), approximately uniform sample of all rows seen so far: after each update every row
    seen is kept with probability about ``max_rows / seen`` (a batched reservoir), so percentile and MSE
    initialisation weigh early and late batches (e.g. timesteps) alike.
    """

    def __init__(self, num_channels: int, max_rows: int, seed: int = 0) -> None:
        self.num_channels, self.max_rows = num_channels, max_rows
        self.seen = 0
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.samples: torch.Tensor | None = None
        # A private generator keeps calibration reproducible without touching the global RNG.
        self._gen = torch.Generator().manual_seed(seed)

    def _subset(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        if k >= rows.shape[0]:
            return rows
        idx = torch.randperm(rows.shape[0], generator=self._gen)[:k]
        return rows[idx.to(rows.device)]

    def update(self, rows: torch.Tensor) -> None:
        """Add a block of rows ``[n, C]``."""
        rows = rows.detach().float()
        lo, hi = rows.amin(dim=0), rows.amax(dim=0)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
        n, total = rows.shape[0], self.seen + rows.shape[0]
        keep_new = n if total <= self.max_rows else round(self.max_rows * n / total)
        new = self._subset(rows, keep_new)
        if self.samples is None:
            self.samples = new
        else:
            old = self._subset(self.samples, self.max_rows - new.shape[0])
            self.samples = torch.cat([old, new])
        self.seen = total
