"""The command line: a LightningCLI over every LightningModule and DataModule of the project."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from accuquant_pl.calibration.checkpoint import (
    CheckpointError,
    checkpoint_data_config,
    is_file_path,
    read_checkpoint,
    settings_differences,
)


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse reports a bad class_path itself, with a better message


class AccuQuantCLI(LightningCLI):
    """``fit``/``validate``/``test``/``predict`` with ``model.class_path`` and ``data.class_path`` chosen in YAML."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--use_checkpoint_config", type=bool, default=False,
            help="With fit --ckpt_path: resume with the checkpoint's model and data settings where they differ from "
                 "the config given. By default such a resume stops before any work and lists the differences.")
        parser.add_argument(
            "--threads", type=PositiveInt | None, default=None,
            help="CPU threads of torch for this command (torch.set_num_threads); default: torch's own (the machine's "
                 "cores). On a machine busy with other work, 1 is often faster. A calibration records it: the "
                 "export's last bits depend on it, so a resume under another count is refused as other settings are.")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI's first step after parsing: the thread count is set here, before any class is built.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.get("threads") is not None:
            torch.set_num_threads(config.get("threads"))
        if not subcommand:
            return
        ckpt_path = config.get("ckpt_path")
        checkpoint = read_checkpoint(ckpt_path) if ckpt_path and is_file_path(ckpt_path) else None
        # LightningCLI replaces the model config by the checkpoint's hyperparameters. An evaluation model
        # that declares ``converts_calibration_checkpoints`` reads a calibration checkpoint itself, so the
        # model the user configured must stay.
        model = config.get("model")
        cls = _import(model.class_path) if getattr(model, "class_path", None) else None
        if getattr(cls, "converts_calibration_checkpoints", False):
            return
        section = getattr(cls, "CHECKPOINT_SECTION", None)
        if subcommand == "fit" and checkpoint is not None and section is not None:
            if section not in checkpoint:
                written_by = (checkpoint.get("hyper_parameters") or {}).get("_class_path", "another module")
                raise CheckpointError(f"--ckpt_path {ckpt_path} was written by {written_by}, not by a "
                                      f"{cls.__name__} calibration (it has no {section!r} section)")
            self._check_resume_settings(config, checkpoint, section)
        super()._parse_ckpt_path()

    def _check_resume_settings(self, config: Any, checkpoint: dict[str, Any], section: str) -> None:
        """Refuse a resume whose model or data settings differ from the checkpoint's, unless
        ``--use_checkpoint_config`` asks for the checkpoint's (then the data config is replaced too; Lightning
        replaces the model's)."""
        as_dict = lambda ns: ns.as_dict() if hasattr(ns, "as_dict") else dict(ns or {})  # noqa: E731
        data = as_dict(config.get("data")) if config.get("data") is not None else None
        precision = config.get("trainer", {}).get("precision")
        differences = settings_differences(checkpoint, as_dict(config.get("model")), data, precision, section,
                                           threads=torch.get_num_threads())
        if not differences:
            return
        if not config.get("use_checkpoint_config"):
            listed = "\n  ".join(differences)
            raise CheckpointError(
                f"--ckpt_path {config.get('ckpt_path')} was written with other settings than the ones given "
                f"(checkpoint -> requested):\n  {listed}\nResume with the checkpoint's settings "
                "(--use_checkpoint_config true), or start a new run without --ckpt_path.")
        replaced: dict[str, Any] = {}
        if data is not None and checkpoint.get("datamodule_hyper_parameters") is not None:
            replaced["data"] = checkpoint_data_config(checkpoint, data)
        saved_precision = checkpoint[section].get("precision")
        if saved_precision is not None:
            replaced["trainer"] = {"precision": saved_precision}
        saved_threads = checkpoint[section].get("threads")
        if saved_threads is not None:
            replaced["threads"] = saved_threads
            torch.set_num_threads(saved_threads)
        if replaced:
            self.config = self.parser.parse_object({self.config.subcommand: replaced}, self.config)


def main(args: list[str] | None = None, run: bool = True) -> AccuQuantCLI:
    """Entry point of ``python main.py``; ``args`` lets tests drive it in-process (errors raise)."""
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


def script_main() -> None:
    """``python main.py``: as :func:`main`, but a checkpoint that cannot be resumed from ends the program with
    its one-paragraph message instead of a traceback."""
    try:
        main()
    except CheckpointError as err:
        sys.exit(f"error: {err}")
