"""Quantized-vs-FP comparisons from the same initial noise: final-sample error and error-accumulation curves."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin
from torch import Tensor, nn

from accuquant_pl.sampling import Conditioning, initial_noise, model_output, sample


@dataclass
class PairedErrors:
    """Errors of a quantized sampler against the FP sampler started from the same noises."""

    final_mse: float
    """Mean squared error of the final samples (images in [-1, 1])."""
    final_psnr: float
    """PSNR of the final samples against FP, in dB (peak-to-peak range 2)."""
    per_step: list[float]
    """MSE of the quantized vs FP model output on the FP state x_k, for every step k (no accumulation)."""
    accumulated: list[float]
    """MSE of the quantized sampler's own state vs the FP state after every step k."""
    fp_samples: Tensor
    """Final FP samples (N, C, H, W), clamped to [-1, 1]."""
    q_samples: Tensor
    """Final quantized samples from the same noises, clamped to [-1, 1]."""


@torch.no_grad()
def paired_errors(fp_unet: nn.Module, q_unet: nn.Module, scheduler: SchedulerMixin, seeds: list[int],
                  num_inference_steps: int, cond: Conditioning | None = None, batch_size: int = 64) -> PairedErrors:
    """Run FP and quantized samplers from the noises of ``seeds`` and compare them step by step."""
    shape = (fp_unet.config.in_channels, fp_unet.config.sample_size, fp_unet.config.sample_size)
    sums_step = torch.zeros(num_inference_steps, dtype=torch.float64)
    sums_acc = torch.zeros(num_inference_steps, dtype=torch.float64)
    device = next(fp_unet.parameters()).device
    finals: dict[str, list[Tensor]] = {"fp": [], "q": []}
    for start in range(0, len(seeds), batch_size):
        noise = initial_noise(seeds[start : start + batch_size], shape).to(device)
        fp = sample(fp_unet, scheduler, noise, num_inference_steps, cond, keep_trajectory=True)
        q = sample(q_unet, scheduler, noise, num_inference_steps, cond, keep_trajectory=True)
        finals["fp"].append(fp.states[-1].clamp(-1, 1).cpu())
        finals["q"].append(q.states[-1].clamp(-1, 1).cpu())
        for k, t in enumerate(fp.timesteps):
            x = scheduler.scale_model_input(fp.states[k], t)
            diff = model_output(q_unet, x, t, cond) - model_output(fp_unet, x, t, cond)
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
                 batch_size: int = 64) -> Tensor:
    """Final samples (N, C, H, W) for ``seeds``."""
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    device = next(unet.parameters()).device
    out = [sample(unet, scheduler, initial_noise(seeds[s : s + batch_size], shape).to(device), num_inference_steps)
           for s in range(0, len(seeds), batch_size)]
    return torch.cat(out).clamp(-1, 1).cpu()
