"""ExportQuantized: the folder records what the calibration ran on (FP model, sampler), and quantized_pipeline
samples with that sampler by default."""

from __future__ import annotations

import pytest
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler

from accuquant_pl.cli import main
from accuquant_pl.deploy import exported_sampler, quantized_pipeline
from accuquant_pl.deploy.artifact import exported_pretrained
from tests.calibration.test_calibration_cli import tiny_args


def test_the_export_records_the_calibration_sampler_and_the_pipeline_uses_it(tmp_path, tiny_model_dir):
    # The teacher's own scheduler config is DDPM's: the pipeline's DPM-Solver++ (SDE) can only come from the record.
    main([*tiny_args(tmp_path, tiny_model_dir, "digits_w8a8_rtn.yaml"), "--data.init_args.scheduler",
          "sde-dpmsolver++", "--data.init_args.num_inference_steps", "5"])
    folder = tmp_path / "run" / "quantized"
    assert exported_sampler(folder) == {"scheduler": "sde-dpmsolver++", "num_inference_steps": 5, "eta": 0.0,
                                        "guidance_scale": 1.0}
    assert exported_pretrained(folder) == str(tiny_model_dir)
    pipe = quantized_pipeline(folder)
    assert type(pipe) is DDPMPipeline and type(pipe.scheduler) is DPMSolverMultistepScheduler
    assert pipe.scheduler.config.algorithm_type == "sde-dpmsolver++"
    ddim = quantized_pipeline(folder, scheduler="ddim")
    assert type(ddim) is DDIMPipeline and type(ddim.scheduler) is DDIMScheduler
    # DDPMPipeline's loop does not scale the model input: a sigma-space sampler is refused, not sampled wrong
    with pytest.raises(TypeError, match="EulerDiscreteScheduler scales the model input"):
        quantized_pipeline(folder, scheduler="euler")
