"""Checkpoints during calibration: written after every unit (also by Lightning's own ModelCheckpoint in a plain
Trainer), inside long epochs by time, and always to the same last.ckpt."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from accuquant_pl.calibration.module import BlockReconstruction
from accuquant_pl.cli import main
from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.quant import QuantSpec
from callbacks.checkpoint import AtomicCheckpointIO, CalibrationCheckpoint
from tests.calibration.test_calibration_cli import tiny_args


class RecordSaves(AtomicCheckpointIO):
    """(global step, done units, iteration inside the unit) of every checkpoint written."""

    def __init__(self) -> None:
        super().__init__()
        self.saves: list[tuple[int, int, object]] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        state = checkpoint["accuquant"]
        mid = state["mid_epoch"]
        self.saves.append((checkpoint["global_step"], len(state["done_units"]), mid and mid["iteration"]))
        super().save_checkpoint(checkpoint, path, storage_options)


def _fit(tmp_path, model_dir, callbacks, epochs: int, record: RecordSaves) -> BlockReconstruction:
    data = TrajectoryDataModule(pretrained=str(model_dir), num_inference_steps=5, num_trajectories=4, batch_size=4,
                                cache_dir=str(tmp_path / "cache"))
    model = BlockReconstruction(pretrained=str(model_dir), quant=QuantSpec(weight_bits=4, act_bits=8, adaround=True),
                                objective="per_step", iterations_per_unit=3, act_calibration_samples=8)
    trainer = L.Trainer(accelerator="cpu", callbacks=callbacks, logger=False, enable_progress_bar=False,
                        max_epochs=epochs, default_root_dir=tmp_path, enable_model_summary=False, plugins=[record])
    trainer.fit(model, data)
    return model


def test_lightnings_model_checkpoint_saves_after_every_unit_in_a_plain_trainer(tmp_path, tiny_model_dir):
    # Before: the module stepped its optimiser itself, global_step stayed 0 and ModelCheckpoint skipped every
    # epoch-end save as "already saved at this step".
    record = RecordSaves()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                 save_on_train_epoch_end=True, filename="{epoch}")
    _fit(tmp_path, tiny_model_dir, [checkpoint], epochs=3, record=record)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]
    assert [(step, done) for step, done, _ in record.saves] == [(3, 1), (6, 2), (9, 3)]
    assert torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=True)["global_step"] == 6


def test_every_n_seconds_zero_saves_after_every_step_with_its_position(tmp_path, tiny_model_dir):
    record = RecordSaves()
    _fit(tmp_path, tiny_model_dir, [CalibrationCheckpoint(str(tmp_path / "ckpt"), every_n_seconds=0)], epochs=2,
         record=record)
    # Inside a unit the checkpoint carries the unit's position; its last step hardens the unit (no position).
    assert record.saves == [(1, 0, 1), (2, 0, 2), (3, 1, None), (4, 1, 1), (5, 1, 2), (6, 2, None)]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]


def test_a_new_run_overwrites_last_ckpt_instead_of_writing_last_v1(tmp_path, tiny_model_dir):
    main([*tiny_args(tmp_path, tiny_model_dir, name="run"), "--trainer.max_epochs", "1"])
    main([*tiny_args(tmp_path, tiny_model_dir, name="run"), "--trainer.max_epochs", "2"])
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert len(torch.load(folder / "last.ckpt", weights_only=True)["accuquant"]["done_units"]) == 2


def test_a_negative_interval_is_named():
    with pytest.raises(ValueError, match="every_n_seconds must be >= 0"):
        CalibrationCheckpoint(every_n_seconds=-1)
