"""The command line: a LightningCLI over every LightningModule and DataModule of the project."""

from __future__ import annotations

import importlib

import lightning as L
from lightning.pytorch.cli import LightningCLI


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse reports a bad class_path itself, with a better message


class AccuQuantCLI(LightningCLI):
    """``fit``/``validate``/``test``/``predict`` with ``model.class_path`` and ``data.class_path`` chosen in YAML."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model config by the checkpoint's hyperparameters. An evaluation model
        # that declares ``converts_calibration_checkpoints`` reads a calibration checkpoint itself, so the
        # model the user configured must stay.
        subcommand = self.config.get("subcommand")
        if subcommand:
            model = self.config[subcommand].get("model")
            cls = _import(model.class_path) if getattr(model, "class_path", None) else None
            if getattr(cls, "converts_calibration_checkpoints", False):
                return
        super()._parse_ckpt_path()


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
