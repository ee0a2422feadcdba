"""The diffusion side, independent of quantization: loading model folders, schedulers, conditioning, the one
sampling loop, and the digits teacher's pretraining module."""

from accuquant_pl.diffusion.conditioning import Conditioning, ConditioningSpec, load_prompt_embeddings
from accuquant_pl.diffusion.loading import (
    inspect_model_folder,
    load_denoiser,
    load_scheduler_config,
    load_vae,
)
from accuquant_pl.diffusion.pretraining import DiffusionPretraining, DiTPretraining
from accuquant_pl.diffusion.sampling import initial_noise, model_output, network_inputs, sample
from accuquant_pl.diffusion.schedulers import SCHEDULERS, scheduler_from_config, scheduler_names

__all__ = [
    "SCHEDULERS",
    "Conditioning",
    "ConditioningSpec",
    "DiffusionPretraining",
    "DiTPretraining",
    "initial_noise",
    "inspect_model_folder",
    "load_prompt_embeddings",
    "load_scheduler_config",
    "load_denoiser",
    "load_vae",
    "model_output",
    "network_inputs",
    "sample",
    "scheduler_from_config",
    "scheduler_names",
]
