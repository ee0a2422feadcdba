"""Evaluation of conditional and latent models: ``SampleEvaluation`` and ``FIDCallback`` sample FP and evaluated
models with the same class labels / prompts and guidance as ``predict``, and compute image metrics on decoded
latents while the error curves stay in latent space."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from accuquant_pl.calibration.module import BlockReconstruction
from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.diffusion import ConditioningSpec
from accuquant_pl.evaluation.generation import SampleGeneration
from accuquant_pl.evaluation.module import SampleEvaluation
from tests.conftest import fit_with_final_fid
from tests.tiny_models import model_folder

STEPS = 4
SEEDS = torch.tensor([5, 6, 7])
CLASS = {"class_labels": [0, 3, 7], "uncond_class_label": 10, "guidance_scale": 3.0}


def evaluation(folder: Path, tmp_path: Path, **cond) -> SampleEvaluation:
    return SampleEvaluation(pretrained=str(folder), num_inference_steps=STEPS, features="random-projection",
                            real_dataset=None, stats_cache_dir=None, output_dir=None,
                            conditioning=ConditioningSpec(**cond) if cond else None)


def predicted(folder: Path, **cond) -> torch.Tensor:
    return SampleGeneration(pretrained=str(folder), num_inference_steps=STEPS,
                            conditioning=ConditioningSpec(**cond) if cond else None).predict_step(SEEDS, 0)


def test_class_conditional_evaluation_samples_with_the_seeds_labels_and_guidance(tmp_path):
    folder = model_folder("class", tmp_path)
    module = evaluation(folder, tmp_path, **CLASS)
    module._step(SEEDS)
    fp = module._fp[0]
    torch.testing.assert_close(fp, predicted(folder, **CLASS))
    torch.testing.assert_close(module._fp_other[0].shape, fp.shape)
    # the labels reach the network: other labels (or no guidance) give other samples
    assert not torch.allclose(fp, predicted(folder, **{**CLASS, "class_labels": [1, 2, 4]}))
    assert not torch.allclose(fp, predicted(folder, **{**CLASS, "guidance_scale": 1.0}))


def test_text_conditional_latent_evaluation_decodes_images_and_keeps_latent_curves(tmp_path):
    folder = model_folder("t2i", tmp_path)
    cond = {"prompt_embeddings": str(tmp_path / "prompts.pt"), "guidance_scale": 3.0}
    module = evaluation(folder, tmp_path, **cond)
    module._step(SEEDS)
    assert module._fp[0].shape == (3, 3, 16, 16), "4x8x8 latents decode to 3x16x16 images"
    torch.testing.assert_close(module._fp[0], predicted(folder, **cond))
    assert module._per_step.shape == (STEPS,)


def test_fid_callback_samples_a_conditional_latent_model_like_predict(tmp_path):
    folder = model_folder("t2i", tmp_path)
    prompts = str(tmp_path / "prompts.pt")
    dm = TrajectoryDataModule(pretrained=str(folder), num_inference_steps=STEPS, num_trajectories=2, batch_size=2,
                              group_size=1, cache_dir=str(tmp_path / "cache"),
                              conditioning=ConditioningSpec(prompt_embeddings=prompts, guidance_scale=3.0))
    module = BlockReconstruction(pretrained=str(folder), objective="per_step", iterations_per_unit=1,
                                 act_calibration_samples=8)  # every item: each timestep group sees inputs
    callback = fit_with_final_fid(module, dm, tmp_path / "fid", STEPS)
    want = predicted(folder, prompt_embeddings=prompts, guidance_scale=3.0)
    assert callback._fp.shape == want.shape == (3, 3, 16, 16)
    torch.testing.assert_close(callback._fp, want)
    assert callback.history and callback.history[-1]["tag"] == "final"


def test_guidance_with_labels_needs_the_unconditional_label(tmp_path):
    with pytest.raises(ValueError, match="uncond_class_label"):
        evaluation(model_folder("class", tmp_path), tmp_path, class_labels=[0], guidance_scale=2.0)
