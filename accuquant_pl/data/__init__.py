"""Data modules: FP sampler trajectories for calibration, seeds for sampling and evaluation, the digits."""

from accuquant_pl.data.digits import DigitsDataModule
from accuquant_pl.data.seeds import SeedDataModule
from accuquant_pl.data.trajectories import TrajectoryAblations, TrajectoryDataModule

__all__ = ["DigitsDataModule", "SeedDataModule", "TrajectoryAblations", "TrajectoryDataModule"]
