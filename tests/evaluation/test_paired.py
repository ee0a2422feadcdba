import copy

import torch
from diffusers import DDIMScheduler

from accuquant_pl.evaluation.paired import paired_errors
from tests.conftest import tiny_unet


def test_identical_models_have_zero_error():
    unet = tiny_unet().eval()
    errors = paired_errors(unet, copy.deepcopy(unet), DDIMScheduler(num_train_timesteps=100), [0, 1, 2], 4)
    assert errors.final_mse == 0.0 and max(errors.per_step) == 0.0 and len(errors.accumulated) == 4


def test_perturbed_model_errors_are_consistent():
    unet = tiny_unet().eval()
    other = copy.deepcopy(unet)
    with torch.no_grad():
        other.conv_out.bias.add_(0.05)
    errors = paired_errors(unet, other, DDIMScheduler(num_train_timesteps=100), [0, 1, 2, 3], 5, batch_size=3)
    # A constant output offset of 0.05 gives a per-step output MSE of 0.0025 on every FP state.
    assert all(abs(e - 0.0025) < 1e-6 for e in errors.per_step)
    assert errors.accumulated[-1] == errors.final_mse > 0
    assert errors.final_psnr < 100
