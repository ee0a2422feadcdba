"""Transformer denoisers end to end: a tiny class-conditional DiT calibrated through the CLI (per-step, and
AccuQuant with its final stage), exported, sampled by ``predict``, evaluated by ``SampleEvaluation`` and the
``FIDCallback`` with the same labels and guidance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from accuquant_pl.calibration.module import BlockReconstruction
from accuquant_pl.cli import main
from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.deploy import load_quantized
from accuquant_pl.diffusion import ConditioningSpec
from accuquant_pl.evaluation.generation import SampleGeneration
from accuquant_pl.evaluation.module import SampleEvaluation
from tests.conftest import REPO, fit_with_final_fid, quick_fit_args
from tests.evaluation.test_module import eval_args
from tests.tiny_models import save_transformer_folder, tiny_dit

STEPS = 4
CLASS = {"class_labels": [0, 3, 7, 9], "uncond_class_label": 10, "guidance_scale": 2.0}
SEEDS = torch.tensor([5, 6, 7])


@pytest.fixture
def dit_folder(tmp_path) -> Path:
    return save_transformer_folder(tmp_path / "dit", tiny_dit(learned_sigma=True))


def fit_args(tmp_path: Path, folder: Path, config: str, conditioning: dict | None = None, **model) -> list[str]:
    return quick_fit_args(tmp_path, config, folder, "run", model,
                          {"num_inference_steps": STEPS, "conditioning": conditioning or CLASS})


@pytest.mark.parametrize("config, model", [
    ("digits_w4a8_qdiff.yaml", {}),
    ("digits_w4a8_accuquant.yaml", {"final_stage": {"iterations": 2, "group_size": 2}}),
])
def test_a_dit_calibrates_exports_and_samples(tmp_path, dit_folder, config, model):
    args = fit_args(tmp_path, dit_folder, config, **model)
    if "accuquant" in config:
        args += ["--data.init_args.group_size", "2"]
    cli = main(args)
    module = cli.model
    assert module.unit_names == ["pos_embed", "transformer_blocks.0", "transformer_blocks.1", "proj_out_1",
                                 "proj_out_2"]
    assert len(module.done_units) == len(module.unit_names)
    assert torch.isfinite(cli.trainer.callback_metrics["calib/loss"])
    quantized = tmp_path / "run" / "quantized"
    loaded = load_quantized(quantized)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 60]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, class_labels=y).sample, module.student(x, t, class_labels=y).sample)
    sampler = SampleGeneration(pretrained=str(dit_folder), quantized=str(quantized), num_inference_steps=STEPS,
                               conditioning=ConditioningSpec(**CLASS))
    images = sampler.predict_step(SEEDS, 0)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    if "accuquant" not in config:
        return
    # the user's commands on the export: `main.py predict` writes the same images, `main.py test` scores them
    out = tmp_path / "samples"
    main(["predict", "--config", str(REPO / "configs" / "sample_digits.yaml"),
          "--model.init_args.pretrained", str(dit_folder), "--model.init_args.quantized", str(quantized),
          "--model.init_args.num_inference_steps", str(STEPS), "--model.init_args.conditioning", json.dumps(CLASS),
          "--data.init_args.num_samples", "3", "--data.init_args.first_seed", "5",
          "--trainer.callbacks.init_args.output_dir", str(out), "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    written = torch.from_numpy(np.load(out / "samples.npz")["images"])
    torch.testing.assert_close(written, images, rtol=0, atol=1e-6)
    main(eval_args(tmp_path, dit_folder, "test", quantized=str(quantized), conditioning=CLASS))
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert metrics["num_samples"] == 12 and 0 < metrics["mse"] < float("inf") and metrics["fid2fp32"] > 0


def test_dit_evaluation_and_fid_callback_sample_with_the_labels(tmp_path, dit_folder):
    evaluation = SampleEvaluation(pretrained=str(dit_folder), num_inference_steps=STEPS, features="random-projection",
                                  real_dataset=None, stats_cache_dir=None, output_dir=None,
                                  conditioning=ConditioningSpec(**CLASS))
    evaluation._step(SEEDS)
    want = SampleGeneration(pretrained=str(dit_folder), num_inference_steps=STEPS,
                            conditioning=ConditioningSpec(**CLASS)).predict_step(SEEDS, 0)
    torch.testing.assert_close(evaluation._fp[0], want)
    other = SampleGeneration(pretrained=str(dit_folder), num_inference_steps=STEPS,
                             conditioning=ConditioningSpec(**{**CLASS, "class_labels": [1, 2, 4, 5]}))
    assert not torch.allclose(other.predict_step(SEEDS, 0), want)  # the labels reach the transformer
    dm = TrajectoryDataModule(pretrained=str(dit_folder), num_inference_steps=STEPS, num_trajectories=4, batch_size=2,
                              cache_dir=str(tmp_path / "cache"), conditioning=ConditioningSpec(**CLASS))
    module = BlockReconstruction(pretrained=str(dit_folder), objective="per_step", iterations_per_unit=1,
                                 act_calibration_samples=8)
    callback = fit_with_final_fid(module, dm, tmp_path / "fid", STEPS)
    torch.testing.assert_close(callback._fp, want)
    assert callback.history and callback.history[-1]["tag"] == "final"


def test_unsupported_denoisers_name_the_supported_ones(tmp_path):
    from diffusers import SD3Transformer2DModel

    from accuquant_pl.diffusion.loading import load_denoiser

    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                          pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8).save_pretrained(
        tmp_path / "sd3" / "transformer")
    with pytest.raises(ValueError, match=r"'SD3Transformer2DModel', not a supported denoiser; supported: .*"
                                         r"DiTTransformer2DModel.*PixArtTransformer2DModel.*UNet2DModel"):
        load_denoiser(tmp_path / "sd3")


@pytest.mark.parametrize("size_conditions", [False, True])
def test_a_pixart_transformer_calibrates_on_prompt_embeddings_and_samples(tmp_path, size_conditions):
    from tests.tiny_models import save_transformer_folder, tiny_pixart, write_prompts

    folder = save_transformer_folder(tmp_path / "pixart", tiny_pixart(size_conditions=size_conditions),
                                     scheduler="ddim")
    prompts = write_prompts(tmp_path / "prompts.pt", masks=size_conditions)  # and padded prompts with their masks
    final_stage = {"iterations": 2, "group_size": 2} if size_conditions else None
    conditioning = {"prompt_embeddings": str(prompts), "guidance_scale": 3.0}
    args = fit_args(tmp_path, folder, "digits_w4a8_accuquant.yaml", conditioning, final_stage=final_stage)
    cli = main([*args, "--data.init_args.group_size", "2"])
    module = cli.model
    assert module.unit_names[:3] == ["pos_embed", "adaln_single", "caption_projection"]
    assert len(module.done_units) == len(module.unit_names)
    quantized = str(tmp_path / "run" / "quantized")
    sampler = SampleGeneration(pretrained=str(folder), quantized=quantized, num_inference_steps=STEPS,
                               conditioning=ConditioningSpec(**conditioning))
    images = sampler.predict_step(SEEDS, 0)
    assert images.shape == (3, 4, 8, 8) and torch.isfinite(images).all()  # latents: the folder has no vae/
    # `test` samples the export with the same prompts (and masks) as predict
    evaluation = SampleEvaluation(pretrained=str(folder), quantized=quantized, num_inference_steps=STEPS,
                                  features="random-projection", real_dataset=None, stats_cache_dir=None,
                                  output_dir=None, conditioning=ConditioningSpec(**conditioning))
    evaluation._step(SEEDS)
    torch.testing.assert_close(evaluation._q[0], images)
    assert not torch.equal(evaluation._q[0], evaluation._fp[0])  # quantized, not the FP transformer


def test_a_unet_only_option_on_a_transformer_is_named_by_the_cli(tmp_path, dit_folder):
    args = fit_args(tmp_path, dit_folder, "digits_w4a8_qdiff.yaml")
    with pytest.raises(ValueError, match=r"quant.split_skip is a UNet option .*DiTTransformer2DModel has none"):
        main([*args, "--model.init_args.quant.split_skip", "true"])
