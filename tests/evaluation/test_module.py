"""`validate`/`test` through the CLI: FID, FID2FP32, noise floor, error curves, and --ckpt_path conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from accuquant_pl.cli import main
from accuquant_pl.diffusion.loading import load_denoiser
from accuquant_pl.evaluation.paired import samples_from
from accuquant_pl.evaluation.quality import SampleQualityMeter, build_feature_extractor, real_images
from tests.calibration.test_calibration_cli import tiny_args
from tests.conftest import REPO


def eval_args(tmp_path: Path, model_dir: Path, name: str, subcommand: str = "test", **model_args) -> list[str]:
    real = tmp_path / "real.pt"
    if not real.exists():
        torch.save(torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, real)
    override = {
        "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / name), "name": "tb"}},
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"init_args": {"pretrained": str(model_dir), "num_inference_steps": 4, "features": "random-projection",
                                "real_dataset": str(real), "stats_cache_dir": str(tmp_path / "stats"),
                                "output_dir": str(tmp_path / name), **model_args}},
        "data": {"init_args": {"num_samples": 12, "batch_size": 8, "first_seed": 100}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return [subcommand, "--config", str(REPO / "configs" / "evaluate_digits.yaml"), "--config", str(path)]


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_fp_model_against_itself(tmp_path, tiny_model_dir):
    main(eval_args(tmp_path, tiny_model_dir, "fp"))
    m = read_metrics(tmp_path / "fp")
    assert m["mse"] == 0.0 and m["fid2fp32"] == 0.0
    assert m["fid"] == pytest.approx(m["fid_fp"])
    assert m["noise_floor"] > 0, "two disjoint FP sets must differ"
    assert m["kid"] is not None and m["num_samples"] == 12
    assert len(m["per_step"]) == 4 and max(m["accumulated"]) == 0.0
    assert m["digit_changed"] == 0.0 and m["mse_p99"] == 0.0 and m["share_above_threshold"] == 0.0
    assert (tmp_path / "fp" / "error_curves.png").stat().st_size > 1000
    assert (tmp_path / "fp" / "samples.png").exists()
    assert list((tmp_path / "fp" / "tb").rglob("events.out.tfevents.*"))


def test_a_stochastic_sampler_evaluates_fp_against_itself_with_zero_error(tmp_path, tiny_model_dir):
    # FP and "quantized" runs draw the same step noise (each seed's generator), not the global RNG's.
    main(eval_args(tmp_path, tiny_model_dir, "ddpm", scheduler="ddpm"))
    main(eval_args(tmp_path, tiny_model_dir, "eta1", scheduler="ddim", eta=1.0))
    for name in ("ddpm", "eta1"):
        m = read_metrics(tmp_path / name)
        assert m["mse"] < 1e-12 and max(m["accumulated"]) < 1e-12, name  # other noise would give ~1e-1


def test_calibration_checkpoint_evaluates_like_its_exported_model(tmp_path, tiny_model_dir):
    main([*tiny_args(tmp_path, tiny_model_dir, "digits_w4a8_qdiff.yaml", name="calib"), "--trainer.max_epochs", "2"])
    ckpt = tmp_path / "calib" / "checkpoints" / "last.ckpt"
    main([*eval_args(tmp_path, tiny_model_dir, "from_ckpt"), "--ckpt_path", str(ckpt)])
    main(eval_args(tmp_path, tiny_model_dir, "from_folder", quantized=str(tmp_path / "calib" / "quantized")))
    a, b = read_metrics(tmp_path / "from_ckpt"), read_metrics(tmp_path / "from_folder")
    assert a["mse"] > 0, "a W4A8 model must differ from FP"
    for key in ("mse", "fid", "fid2fp32", "noise_floor", "kid", "mse_median", "mse_p99", "digit_changed"):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key
    # The per-sample statistics of the robust protocol: the mean (mse) inside its bootstrap interval.
    assert a["mse_mean_ci_low"] <= a["mse"] <= a["mse_mean_ci_high"] and 0 < a["mse_median"] <= a["mse_p99"]
    assert 0.0 <= a["share_above_threshold"] <= 1.0 and 0.0 <= a["digit_changed"] <= 1.0
    assert a["accumulated"][-1] == pytest.approx(a["mse"], rel=0.2)  # unclamped vs clamped final states


def test_validate_runs_and_writes_metrics(tmp_path, tiny_model_dir):
    main(eval_args(tmp_path, tiny_model_dir, "val", subcommand="validate"))
    assert read_metrics(tmp_path / "val")["stage"] == "val"


def test_ckpt_path_must_be_a_calibration_checkpoint(tmp_path, tiny_model_dir):
    bogus = tmp_path / "bogus.ckpt"
    import lightning

    torch.save({"state_dict": {}, "loops": {}, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": lightning.__version__}, bogus)
    with pytest.raises(ValueError, match="calibration checkpoint"):
        main([*eval_args(tmp_path, tiny_model_dir, "bogus"), "--ckpt_path", str(bogus)])


def test_same_seeds_give_identical_fp_samples(tiny_model_dir):
    unet = load_denoiser(tiny_model_dir)
    from accuquant_pl.diffusion import load_scheduler_config, scheduler_from_config

    scheduler = scheduler_from_config("ddim", load_scheduler_config(tiny_model_dir))
    a = samples_from(unet, scheduler, [5, 6, 7], 4)
    b = samples_from(load_denoiser(tiny_model_dir), scheduler, [5, 6, 7], 4)
    assert torch.equal(a, b)
    assert not torch.equal(a, samples_from(unet, scheduler, [8, 9, 10], 4))


def test_meter_rejects_mismatched_sets_and_unknown_names(tmp_path):
    meter = SampleQualityMeter("random-projection", None, 8, None, kid=False)
    with pytest.raises(ValueError, match="differ in shape"):
        meter.measure(torch.zeros(4, 1, 8, 8), torch.zeros(5, 1, 8, 8))
    with pytest.raises(ValueError, match="unknown feature extractor 'vgg'"):
        build_feature_extractor("vgg")
    with pytest.raises(ValueError, match="unknown real dataset 'cifar'"):
        real_images("cifar", 8)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        real_images(str(tmp_path / "missing.pt"), 8)


def test_meter_figures_grow_with_distortion():
    meter = SampleQualityMeter("random-projection", None, 8, None, kid=False)
    fp = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    figures = [meter.measure((fp + s * noise).clamp(-1, 1), fp) for s in (0.05, 0.2, 0.5)]
    assert figures[0].mse < figures[1].mse < figures[2].mse
    assert figures[0].fid2fp32 < figures[1].fid2fp32 < figures[2].fid2fp32
