"""The command line: a LightningCLI over every LightningModule and DataModule of the project."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


class AccuQuantCLI(LightningCLI):
    """``fit``/``validate``/``test``/``predict`` with ``model.class_path`` and ``data.class_path`` chosen in YAML."""


def main(args: list[str] | None = None, run: bool = True) -> AccuQuantCLI:
    """Entry point of ``python main.py``; ``args`` lets tests drive it in-process."""
    return AccuQuantCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
