"""ExportQuantized: the folder records what the calibration ran on (FP model, sampler), and quantized_pipeline
samples with that sampler by default."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler

from accuquant_pl.cli import main
from accuquant_pl.deploy import exported_sampler, quantized_pipeline
from accuquant_pl.deploy.artifact import exported_source_model
from tests.calibration.test_calibration_cli import tiny_args


def test_the_export_records_the_calibration_sampler_and_the_pipeline_uses_it(tmp_path, tiny_model_dir):
    main([*tiny_args(tmp_path, tiny_model_dir, "digits_w8a8_rtn.yaml"), "--data.init_args.scheduler", "ddpm",
          "--data.init_args.num_inference_steps", "5"])
    folder = tmp_path / "run" / "quantized"
    assert exported_sampler(folder) == {"scheduler": "ddpm", "num_inference_steps": 5, "eta": 0.0}
    assert exported_source_model(folder) == str(tiny_model_dir)
    assert type(quantized_pipeline(folder).scheduler) is DDPMScheduler
    assert type(quantized_pipeline(folder, scheduler="ddim").scheduler) is DDIMScheduler
