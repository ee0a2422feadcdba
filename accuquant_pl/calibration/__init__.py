"""Calibration: the block-reconstruction LightningModule, its typed settings, objectives and rollouts, resume and
restore."""

from accuquant_pl.calibration.config import Ablations, FinalStage, Rounding
from accuquant_pl.calibration.module import BlockReconstruction

__all__ = ["Ablations", "BlockReconstruction", "FinalStage", "Rounding"]
