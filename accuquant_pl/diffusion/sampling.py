"""One sampling loop for everything (sample grids, calibration trajectories, evaluation), on diffusers schedulers."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import SchedulerMixin
from torch import Tensor, nn

from accuquant_pl.denoisers import denoiser_class, is_transformer
from accuquant_pl.diffusion.conditioning import Conditioning
from accuquant_pl.diffusion.noise import step_generators, step_kwargs


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with its seed: what a diffusers pipeline takes as
    ``generator=[torch.Generator().manual_seed(s) for s in seeds]``."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def seeded_noise(seeds: Sequence[int], shape: Sequence[int],
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, list[torch.Generator]]:
    """:func:`initial_noise` and the seeds' generators after drawing it: passed to :func:`sample` as ``generator``,
    they draw a stochastic sampler's step noise as a diffusers pipeline given the same generators does."""
    generators = seed_generators(seeds)
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in generators]), generators


def initial_noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise of shape ``(len(seeds), *shape)``, row i drawn from its own CPU generator seeded ``seeds[i]``.

    A per-row generator makes sample i independent of batch size, rank and device, so FP and quantized
    samples pair up exactly and DDP shards reproduce a single-process run.
    """
    return seeded_noise(seeds, shape, dtype)[0]


def _needs_encoder_states(unet: nn.Module | None) -> bool:
    """True for UNets whose ``forward`` requires ``encoder_hidden_states`` (``UNet2DConditionModel``)."""
    if unet is None:
        return False
    param = inspect.signature(unet.forward).parameters.get("encoder_hidden_states")
    return param is not None and param.default is inspect.Parameter.empty


def network_inputs(unet: nn.Module | None, x: Tensor, t: Tensor | int, cond: Conditioning | None = None) -> dict[str, Any]:
    """The keyword arguments (``sample``, ``timestep``, conditioning) that :func:`model_output` gives ``unet``.

    Under classifier-free guidance this is the doubled batch ``[uncond, cond]`` that the diffusers pipelines
    feed the network (a per-item timestep vector is doubled with it); calibration uses it too, so that activation
    ranges and block-output losses see what the guided sampler makes the network see. A
    ``UNet2DConditionModel`` conditioned on class labels alone gets ``encoder_hidden_states=None``.
    """
    inputs: dict[str, Any] = {"sample": x, "timestep": t}
    if cond is not None and cond.guided:
        uncond, condk = cond.kwargs(uncond=True), cond.kwargs()
        if uncond.keys() != condk.keys():
            raise ValueError("guided sampling needs unconditional inputs for every conditional one")
        inputs["sample"] = torch.cat([x, x])
        if isinstance(t, Tensor) and t.ndim > 0 and t.numel() == x.shape[0] and x.shape[0] > 1:
            inputs["timestep"] = torch.cat([t, t])
        inputs.update({k: torch.cat([uncond[k], condk[k]]) for k in condk})
    elif cond is not None:
        inputs.update(cond.kwargs())
    if "encoder_hidden_states" not in inputs and _needs_encoder_states(unet):
        inputs["encoder_hidden_states"] = None
    _check_prompt_masks(unet, inputs)
    if is_transformer(unet):
        # The transformers name their input hidden_states and embed one timestep per sample (1-D).
        inputs["hidden_states"] = inputs.pop("sample")
        t = torch.as_tensor(inputs["timestep"], device=x.device)
        if t.ndim == 0:
            inputs["timestep"] = t.reshape(1).expand(inputs["hidden_states"].shape[0])
        if getattr(unet, "use_additional_conditions", False):
            inputs["added_cond_kwargs"] = size_conditions(inputs["hidden_states"])
    return inputs


PIXART_VAE_SCALE = 8
"""Pixels per latent of PixArt's autoencoder (Stable Diffusion's VAE), the PixArt pipelines' default too."""


def size_conditions(latents: Tensor) -> dict[str, Tensor]:
    """PixArt-alpha's micro-conditions for a batch of latents, as PixArtAlphaPipeline builds them for its default
    size: the image height and width in pixels and their ratio, per sample. Only the 1024-px checkpoints
    (``sample_size`` 128, ``use_additional_conditions``) take them; their VAE is SD's, 8 pixels per latent."""
    n, (h, w) = latents.shape[0], latents.shape[-2:]
    height, width = h * PIXART_VAE_SCALE, w * PIXART_VAE_SCALE
    resolution = torch.tensor([height, width], dtype=latents.dtype, device=latents.device).repeat(n, 1)
    aspect_ratio = torch.tensor([height / width], dtype=latents.dtype, device=latents.device).repeat(n, 1)
    return {"resolution": resolution, "aspect_ratio": aspect_ratio}


def _check_prompt_masks(unet: nn.Module | None, inputs: dict[str, Any]) -> None:
    """Prompt attention masks are PixArt's: its pipelines mask the T5 padding, the Stable Diffusion pipelines give
    the UNet none. A mismatch would calibrate the model on inputs its pipeline never gives it."""
    if unet is None or inputs.get("encoder_hidden_states") is None:
        return
    masked = inputs.get("encoder_attention_mask") is not None
    pixart = denoiser_class(unet) == "PixArtTransformer2DModel"
    if masked and not pixart:
        raise ValueError(f"the prompt file's attention masks ('cond_mask', 'uncond_mask') are for PixArt; "
                         f"{denoiser_class(unet)}'s pipeline does not mask its prompts: drop them from the file")
    if pixart and not masked:
        warnings.warn("PixArt prompts without attention masks: its pipelines mask the prompt padding out of "
                      "cross-attention; write the prompt file with tools/encode_prompts.py (cond_mask, uncond_mask)",
                      stacklevel=3)


def model_output(unet: nn.Module, x: Tensor, t: Tensor | int, cond: Conditioning | None = None) -> Tensor:
    """The UNet's prediction that the sampler steps on, with classifier-free guidance when ``cond`` asks for it:
    eps_u + s (eps_c - eps_u), from one batched forward over [uncond, cond] as the diffusers pipelines do it."""
    out = unet(**network_inputs(unet, x, t, cond)).sample
    if cond is not None and cond.guided:
        out_u, out_c = out.chunk(2)
        out = out_u + cond.guidance_scale * (out_c - out_u)
    if is_transformer(unet) and out.shape[1] == 2 * x.shape[1]:
        # A learned variance (DiT, PixArt): the sampler steps on the eps half, as DiTPipeline / PixArt do.
        out = out[:, : x.shape[1]]
    return out


@torch.no_grad()
def decode_latents(vae: nn.Module | None, latents: Tensor) -> Tensor:
    """Images from a latent sampler's final states, as the diffusers latent pipelines decode them:
    ``vae.decode(latents / scaling_factor + shift_factor)`` (AutoencoderKL; a VQModel quantizes them to its
    codebook inside ``decode``, as LDMPipeline does). ``vae=None`` (a pixel-space model) returns ``latents``."""
    if vae is None:
        return latents
    cfg = vae.config
    z = latents / getattr(cfg, "scaling_factor", 1.0)
    shift = getattr(cfg, "shift_factor", None)
    if shift is not None:
        z = z + shift
    param = next(vae.parameters())
    return vae.decode(z.to(param.device, param.dtype)).sample.to(latents.dtype)


def sample_seeds(unet: nn.Module, scheduler: SchedulerMixin, seeds: Sequence[int], shape: Sequence[int],
                 num_inference_steps: int, cond: Conditioning | None = None, eta: float = 0.0,
                 device: torch.device | str = "cpu", keep_trajectory: bool = False) -> Tensor | Trajectory:
    """One sample per seed, its noise all from seed s's CPU generator: the initial noise and then, continuing, a
    stochastic sampler's step noise. That is what the DDPM / DDIM / Stable Diffusion / PixArt pipelines draw given
    ``generator=[Generator().manual_seed(s), ...]``; no sample depends on its batch, rank or device, and two models
    sampled from the same seeds meet the same noise. (Calibration trajectories use ``noise_seeds`` instead: the
    rollout replays any step's noise from (seed, step) alone.)"""
    noise, generators = seeded_noise(seeds, shape)
    return sample(unet, scheduler, noise.to(device), num_inference_steps, cond, eta=eta, generator=generators,
                  keep_trajectory=keep_trajectory)


@dataclass
class Trajectory:
    """States x_S..x_0 of one sampling run, with the timestep and the model output of every step."""

    states: Tensor
    """(S+1, B, C, H, W): states[0] is the initial noise, states[S] the final sample."""
    timesteps: Tensor
    """(S,) the scheduler's timesteps, in the order they were used."""
    model_outputs: Tensor | None = field(default=None)
    """(S, B, C, H, W) the (guided) model output at every step, when kept."""


@torch.no_grad()
def sample(
    unet: nn.Module,
    scheduler: SchedulerMixin,
    noise: Tensor,
    num_inference_steps: int,
    cond: Conditioning | None = None,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    keep_trajectory: bool = False,
    keep_model_outputs: bool = False,
    noise_seeds: Sequence[int] | None = None,
) -> Tensor | Trajectory:
    """Run the sampler from ``noise``; return the final sample, or the whole trajectory when asked.

    A stochastic sampler's step noise: with ``noise_seeds`` (one per row, normally the seeds of the initial
    noise), row i's noise at step k comes from its own generator (``noise.step_generators``), independent of
    the batch and of the steps before, and the AccuQuant rollout can replay it; else from ``generator`` (one per
    row, as the diffusers pipelines take it, continuing across steps; or the global RNG)."""
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    states, outputs = [x], []
    if noise_seeds is not None and len(noise_seeds) != noise.shape[0]:
        raise ValueError(f"{len(noise_seeds)} noise seeds for a batch of {noise.shape[0]}")
    extra = step_kwargs(scheduler, eta, generator)
    for k, t in enumerate(scheduler.timesteps):
        out = model_output(unet, scheduler.scale_model_input(x, t), t, cond)
        if noise_seeds is not None:
            extra = step_kwargs(scheduler, eta, step_generators(noise_seeds, k))
        x = scheduler.step(out, t, x, **extra).prev_sample
        if keep_trajectory:
            states.append(x)
            if keep_model_outputs:
                outputs.append(out)
    if not keep_trajectory:
        return x
    return Trajectory(
        states=torch.stack(states),
        timesteps=scheduler.timesteps.detach().cpu().clone(),
        model_outputs=torch.stack(outputs) if keep_model_outputs else None,
    )
