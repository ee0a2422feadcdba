"""FIDCallback in a plain Lightning script: evaluations every k units and at the end, logged, saved, resumable."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from accuquant_pl.calibration.module import BlockReconstruction
from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.diffusion.loading import load_denoiser
from accuquant_pl.evaluation.paired import samples_from
from accuquant_pl.quant import QuantSpec
from callbacks.fid import FIDCallback


def calibrate(tmp_path: Path, model_dir: Path, name: str, with_fid: bool) -> tuple[BlockReconstruction, FIDCallback]:
    real = tmp_path / "real.pt"
    torch.save(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1, real)
    L.seed_everything(0, verbose=False)
    data = TrajectoryDataModule(pretrained=str(model_dir), num_inference_steps=6, num_trajectories=4, batch_size=4,
                                cache_dir=str(tmp_path / "cache"))
    model = BlockReconstruction(pretrained=str(model_dir), quant=QuantSpec(weight_bits=4, act_bits=8, adaround=True),
                                objective="per_step", iterations_per_unit=2, act_calibration_samples=8)
    fid = FIDCallback(every_n_units=3, num_samples=8, num_inference_steps=4, features="random-projection",
                      real_dataset=str(real), stats_cache_dir=str(tmp_path / "stats"),
                      output_dir=str(tmp_path / name / "grids"))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name / "ckpt", save_last=True, save_top_k=0,
                                 save_on_train_epoch_end=True)
    trainer = L.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path / name, name="tb"),
                        callbacks=[checkpoint, *([fid] if with_fid else [])], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, data)
    return model, fid


def test_fid_callback_evaluates_every_k_units_and_at_the_end(tmp_path, tiny_model_dir):
    model, fid = calibrate(tmp_path, tiny_model_dir, "run", with_fid=True)
    units = len(model.unit_names)
    expected = [f"unit_{k:03d}" for k in range(3, units, 3)] + ["final"]
    assert [h["tag"] for h in fid.history] == expected
    final = fid.history[-1]
    assert final["units_done"] == units and final["fid"] is not None and final["fid2fp32"] > 0
    # the final figure is the finalized student's: recompute its MSE directly
    scheduler = TrajectoryDataModule(pretrained=str(tiny_model_dir), num_inference_steps=6).make_scheduler()
    seeds = list(range(200_000, 200_008))
    fp = samples_from(load_denoiser(tiny_model_dir), scheduler, seeds, 4)
    q = samples_from(model.student, scheduler, seeds, 4)
    assert final["mse"] == torch.nn.functional.mse_loss(q, fp).item()
    assert sorted(p.name for p in (tmp_path / "run" / "grids").iterdir()) == sorted(f"{t}.png" for t in expected)
    events = EventAccumulator(str(next((tmp_path / "run" / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "fid/fp_vs_quantized" in events.Tags()["images"]
    assert "fid/fid2fp32" in events.Tags()["scalars"]
    ckpt = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=False)
    stored = next(v for k, v in ckpt["callbacks"].items() if "FIDCallback" in k)
    assert [h["tag"] for h in stored["history"]] == expected[:-1]  # the last checkpoint precedes the final evaluation


def test_fid_callback_does_not_change_the_calibration(tmp_path, tiny_model_dir):
    with_fid, _ = calibrate(tmp_path, tiny_model_dir, "with", with_fid=True)
    without, _ = calibrate(tmp_path, tiny_model_dir, "without", with_fid=False)
    a, b = with_fid.student.state_dict(), without.student.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_fid_callback_rejects_bad_settings():
    import pytest

    with pytest.raises(ValueError, match="every_n_units must be >= 0, got -1"):
        FIDCallback(every_n_units=-1)
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        FIDCallback(num_samples=1)
