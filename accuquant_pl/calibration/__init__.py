"""Calibration: the block-reconstruction LightningModule, its objectives and rollouts, resume and restore."""

from accuquant_pl.calibration.module import BlockReconstruction

__all__ = ["BlockReconstruction"]
