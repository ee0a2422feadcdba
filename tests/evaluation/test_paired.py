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


def test_stochastic_samplers_pair_fp_and_quantized_on_predicts_noise(tiny_model_dir):
    # DDPM and DDIM eta 1 draw step noise: both runs (and predict) take it from each seed's generator, so an
    # identical model has zero error and the samples are predict's, whatever the global RNG holds.
    from accuquant_pl.diffusion.loading import load_denoiser, load_scheduler_config
    from accuquant_pl.diffusion.schedulers import scheduler_from_config
    from accuquant_pl.evaluation.generation import SampleGeneration
    from accuquant_pl.evaluation.paired import samples_from

    unet = load_denoiser(tiny_model_dir)
    for name, eta in (("ddpm", 0.0), ("ddim", 1.0)):
        scheduler = scheduler_from_config(name, load_scheduler_config(tiny_model_dir))
        torch.manual_seed(0)
        errors = paired_errors(unet, copy.deepcopy(unet), scheduler, [3, 4, 5], 4, eta=eta, batch_size=2)
        assert errors.final_mse < 1e-12, name  # other noise would give ~1e-1
        sampler = SampleGeneration(pretrained=str(tiny_model_dir), scheduler=name, num_inference_steps=4, eta=eta)
        with torch.no_grad():
            predicted = sampler.predict_step(torch.tensor([3, 4, 5]), 0)
        torch.testing.assert_close(errors.q_samples, predicted, rtol=0, atol=1e-6)
        torch.manual_seed(1)
        torch.testing.assert_close(samples_from(unet, scheduler, [3, 4, 5], 4, eta=eta), predicted, rtol=0, atol=1e-6)
        if name == "ddim":  # eta reaches the sampler
            assert not torch.allclose(samples_from(unet, scheduler, [3, 4, 5], 4), predicted, atol=1e-4)
