"""What a LightningModule asks of :class:`~accuquant_pl.data.TrajectoryDataModule`, as a description the data module
reads (``trainer.lightning_module.epoch_plan()``): the module never writes into the data module."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EpochPlan:
    """The epochs a calibration runs, as the data module must serve them."""

    pretrained: str | None = None
    """The FP model folder or Hub id whose trajectories to sample, when the data module's own ``pretrained`` is
    unset."""
    batches_per_epoch: int | None = None
    """Batches in every epoch (None: one pass over the groups). A module whose epochs differ in length asks for
    the longest and stops the shorter ones early."""
    group_sizes: dict[int, int] = field(default_factory=dict)
    """Group size n of particular epochs (epoch index -> n); the other epochs use the data module's ``group_size``."""
