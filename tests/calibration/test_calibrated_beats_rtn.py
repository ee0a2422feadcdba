"""Calibration must pay off: per-step W4A8 ends closer to FP than round-to-nearest W4A8 on held-out noises."""

from __future__ import annotations

import lightning as L

from accuquant_pl.calibration.module import BlockReconstruction
from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.diffusion.loading import load_denoiser
from accuquant_pl.evaluation.paired import paired_errors
from accuquant_pl.quant import QuantSpec


def calibrated_final_errors(model_dir, cache_dir, objective: str) -> tuple[float, float]:
    L.seed_everything(0, verbose=False)
    data = TrajectoryDataModule(pretrained=str(model_dir), num_inference_steps=10, num_trajectories=16, batch_size=8,
                                cache_dir=str(cache_dir))
    # A tiny random UNet needs a larger rounding learning rate than the digits teacher to move in 20 steps.
    optimise = {} if objective == "rtn" else {"iterations_per_unit": 20, "lr_adaround": 3e-2}
    module = BlockReconstruction(pretrained=str(model_dir), quant=QuantSpec(weight_bits=4, act_bits=8,
                                 adaround=objective != "rtn"), objective=objective, act_calibration_samples=64,
                                 **optimise)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, data)
    student, teacher, scheduler = module.finalize(), load_denoiser(model_dir), data.make_scheduler()
    # Two disjoint held-out seed sets (calibration used seeds 0..15): the gain must show on both, not on average only.
    return tuple(paired_errors(teacher, student, scheduler, list(range(first, first + 16)), 10).final_mse
                 for first in (1000, 2000))


def test_per_step_calibration_beats_rtn_on_held_out_noise(tmp_path, tiny_model_dir):
    rtn = calibrated_final_errors(tiny_model_dir, tmp_path / "cache", "rtn")
    calibrated = calibrated_final_errors(tiny_model_dir, tmp_path / "cache", "per_step")
    # measured ratios with the default 4 timestep groups: 0.89 and 0.81 on the two sets (0.84 and 0.79 with one
    # activation range, whose RTN is worse), while RTN itself differs by only 1-2 % between them
    for r, c in zip(rtn, calibrated, strict=True):
        assert c < 0.93 * r, f"calibrated final MSE {c:.5f} vs RTN {r:.5f}"
