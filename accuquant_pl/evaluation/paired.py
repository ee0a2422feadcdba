"""Quantized-vs-FP comparisons from the same initial noise: final-sample error and error-accumulation curves."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin
from torch import Tensor, nn

from accuquant_pl.diffusion.conditioning import Conditioning
from accuquant_pl.diffusion.sampling import model_output, sample_seeds

ConditionFn = Callable[[list[int]], Conditioning | None]
"""The conditioning (class labels / prompt embeddings and guidance) of the samples of a list of seeds."""
Decode = Callable[[Tensor], Tensor]
"""Images from a sampler's final states (a latent model's autoencoder decoding)."""


def _images(states: Tensor, decode: Decode | None) -> Tensor:
    return (decode(states) if decode is not None else states).clamp(-1, 1).cpu()


@dataclass
class PairedErrors:
    """Errors of a quantized sampler against the FP sampler started from the same noises."""

    final_mse: float
    """Mean squared error of the final sampler states (images in [-1, 1]; latents for a latent model)."""
    final_psnr: float
    """PSNR of the final samples against FP, in dB (peak-to-peak range 2)."""
    per_step: list[float]
    """MSE of the quantized vs FP model output on the FP state x_k, for every step k (no accumulation)."""
    accumulated: list[float]
    """MSE of the quantized sampler's own state vs the FP state after every step k."""
    fp_samples: Tensor
    """Final FP images (N, C, H, W) (decoded for a latent model), clamped to [-1, 1]."""
    q_samples: Tensor
    """Final quantized images from the same noises (and conditions), clamped to [-1, 1]."""


@torch.no_grad()
def paired_errors(fp_unet: nn.Module, q_unet: nn.Module, scheduler: SchedulerMixin, seeds: list[int],
                  num_inference_steps: int, cond: ConditionFn | None = None, batch_size: int = 64,
                  decode: Decode | None = None, eta: float = 0.0) -> PairedErrors:
    """Run FP and quantized samplers from the noises (and ``cond(seeds)`` conditions) of ``seeds`` and compare
    them step by step. The error curves are in the sampler's space (latents for a latent model); the returned
    samples are images, through ``decode`` when given. A stochastic sampler (``eta`` > 0, DDPM) draws the same
    step noise in both runs: each seed's generator, continued after the initial noise (as ``predict``)."""
    shape = (fp_unet.config.in_channels, fp_unet.config.sample_size, fp_unet.config.sample_size)
    sums_step = torch.zeros(num_inference_steps, dtype=torch.float64)
    sums_acc = torch.zeros(num_inference_steps, dtype=torch.float64)
    device = next(fp_unet.parameters()).device
    finals: dict[str, list[Tensor]] = {"fp": [], "q": []}
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        c = cond(chunk) if cond is not None else None
        fp = sample_seeds(fp_unet, scheduler, chunk, shape, num_inference_steps, c, eta, device, keep_trajectory=True)
        q = sample_seeds(q_unet, scheduler, chunk, shape, num_inference_steps, c, eta, device, keep_trajectory=True)
        finals["fp"].append(_images(fp.states[-1], decode))
        finals["q"].append(_images(q.states[-1], decode))
        for k, t in enumerate(fp.timesteps):
            x = scheduler.scale_model_input(fp.states[k], t)
            diff = model_output(q_unet, x, t, c) - model_output(fp_unet, x, t, c)
            sums_step[k] += diff.pow(2).flatten(1).mean(1).sum().double().cpu()
            sums_acc[k] += (q.states[k + 1] - fp.states[k + 1]).pow(2).flatten(1).mean(1).sum().double().cpu()
    n = len(seeds)
    final = float(sums_acc[-1] / n)
    return PairedErrors(
        final_mse=final,
        final_psnr=10 * math.log10(4.0 / final) if final > 0 else math.inf,
        per_step=(sums_step / n).tolist(),
        accumulated=(sums_acc / n).tolist(),
        fp_samples=torch.cat(finals["fp"]),
        q_samples=torch.cat(finals["q"]),
    )


def samples_from(unet: nn.Module, scheduler: SchedulerMixin, seeds: list[int], num_inference_steps: int,
                 batch_size: int = 64, cond: ConditionFn | None = None, decode: Decode | None = None,
                 eta: float = 0.0) -> Tensor:
    """Final images (N, C, H, W) in [-1, 1] for ``seeds`` (with ``cond(seeds)``; decoded by ``decode``); a
    stochastic sampler's step noise from each seed's generator, as ``predict``."""
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    device = unet.device  # diffusers models and the ONNX Runtime denoiser (which has no parameters) say where they run
    out = []
    for s in range(0, len(seeds), batch_size):
        chunk = seeds[s : s + batch_size]
        c = cond(chunk) if cond is not None else None
        out.append(_images(sample_seeds(unet, scheduler, chunk, shape, num_inference_steps, c, eta, device), decode))
    return torch.cat(out)
