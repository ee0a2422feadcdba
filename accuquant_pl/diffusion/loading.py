"""Load a user's diffusers model folder (UNet + scheduler config, and the autoencoder of a latent model),
validating it before any heavy work."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import (
    AutoencoderKL,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)

from accuquant_pl.denoisers import SUPPORTED_DENOISERS, Denoiser
from accuquant_pl.diffusion.hub import resolve_model_path

LEGACY_TRANSFORMER_CLASS = "Transformer2DModel"
LEGACY_NORM_TYPES: dict[str, str] = {
    "ada_norm_zero": "DiTTransformer2DModel",
    "ada_norm_single": "PixArtTransformer2DModel",
}
"""The Hub's DiT and PixArt-alpha checkpoints (facebook/DiT-XL-2-256, PixArt-alpha/PixArt-XL-2-*) predate the
dedicated classes: their config says ``Transformer2DModel`` and its ``norm_type`` tells which model it is, the
same table diffusers' own loader applies (``_CLASS_REMAPPING_DICT`` in diffusers/models/model_loading_utils.py,
private, hence restated here)."""
DENOISER_SUBFOLDERS = ("unet", "transformer")
UNet = UNet2DModel | UNet2DConditionModel
SUPPORTED_VAES: dict[str, type] = {
    "AutoencoderKL": AutoencoderKL,  # Stable Diffusion, LDM-KL: pipeline component ``vae``
    "VQModel": VQModel,  # LDM-4/8 (CompVis/ldm-*): pipeline component ``vqvae``
}
VAE_SUBFOLDERS = ("vae", "vqvae")
Autoencoder = AutoencoderKL | VQModel


@dataclass(frozen=True)
class ModelFolder:
    """Where the parts of a diffusers model live inside a folder."""

    root: Path
    denoiser_dir: Path
    """The denoiser's folder: ``unet/`` or ``transformer/`` of a pipeline folder, or the root."""
    denoiser_class_name: str
    scheduler_config: dict[str, Any] | None
    vae_dir: Path | None = None
    """The autoencoder of a latent diffusion pipeline folder (``vae/`` or ``vqvae/``); None for pixel space."""
    vae_class: str | None = None

    @property
    def latent(self) -> bool:
        """Whether the UNet works in an autoencoder's latent space (the folder has ``vae/`` or ``vqvae/``)."""
        return self.vae_dir is not None

    @property
    def denoiser_config(self) -> dict[str, Any]:
        return json.loads((self.denoiser_dir / "config.json").read_text())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def denoiser_class_name(config: dict[str, Any], where: str) -> str | None:
    """The denoiser class a diffusers config describes: its ``_class_name``, or for a legacy
    ``Transformer2DModel`` config the DiT/PixArt class its ``norm_type`` stands for (``where`` names the config
    in the error for a norm type with no dedicated class)."""
    name = config.get("_class_name")
    if name != LEGACY_TRANSFORMER_CLASS:
        return name
    norm_type = config.get("norm_type")
    if norm_type not in LEGACY_NORM_TYPES:
        raise ValueError(f"{where} describes a legacy {LEGACY_TRANSFORMER_CLASS} with norm_type {norm_type!r}; "
                         f"supported: {sorted(LEGACY_NORM_TYPES)} (DiT, PixArt) or one of "
                         f"{sorted(SUPPORTED_DENOISERS)}")
    return LEGACY_NORM_TYPES[norm_type]


def inspect_model_folder(path: str | Path) -> ModelFolder:
    """Check that ``path`` holds a diffusers UNet (a pipeline folder with ``unet/`` or a bare UNet folder).

    Only config files are read, so a wrong path fails fast with an error naming it. ``path`` may be a Hub id
    (``owner/name[@revision][:subfolder]``, ``diffusion/hub.py``): its cached snapshot is inspected.
    """
    root = resolve_model_path(path)
    if not root.exists():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"model folder {str(path)!r} is a file, expected a diffusers folder")
    denoiser_dir = next((root / name for name in DENOISER_SUBFOLDERS if (root / name / "config.json").is_file()), root)
    config_file = denoiser_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"model folder {str(path)!r} has neither unet/config.json, transformer/config.json nor config.json; "
            "expected a diffusers save_pretrained folder"
        )
    class_name = denoiser_class_name(_read_json(config_file), f"model folder {str(path)!r}: "
                                     f"{config_file.relative_to(root)}")
    if class_name not in SUPPORTED_DENOISERS:
        raise ValueError(
            f"model folder {str(path)!r}: {config_file.relative_to(root)} describes {class_name!r}, not a supported "
            f"denoiser; supported: {sorted(SUPPORTED_DENOISERS)}"
        )
    if not any(denoiser_dir.glob("diffusion_pytorch_model*")):
        raise FileNotFoundError(f"model folder {str(path)!r}: no diffusion_pytorch_model weights in {denoiser_dir}")
    scheduler_file = next(
        (f for f in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json") if f.is_file()),
        None,
    )
    scheduler_config = _read_json(scheduler_file) if scheduler_file else None
    vae_dir, vae_class = _inspect_vae(root, path) if denoiser_dir != root else (None, None)
    return ModelFolder(root, denoiser_dir, class_name, scheduler_config, vae_dir, vae_class)


def _inspect_vae(root: Path, path: str | Path) -> tuple[Path | None, str | None]:
    """The autoencoder sub-folder of a pipeline folder (``vae/`` or ``vqvae/``), checked like the UNet's."""
    for name in VAE_SUBFOLDERS:
        config_file = root / name / "config.json"
        if not config_file.is_file():
            continue
        vae_class = _read_json(config_file).get("_class_name")
        if vae_class not in SUPPORTED_VAES:
            raise ValueError(f"model folder {str(path)!r}: {name}/config.json describes {vae_class!r}; "
                             f"supported autoencoders: {sorted(SUPPORTED_VAES)}")
        if not any((root / name).glob("diffusion_pytorch_model*")):
            raise FileNotFoundError(f"model folder {str(path)!r}: no diffusion_pytorch_model weights in {root / name}")
        return root / name, vae_class
    return None, None


def load_denoiser(path: str | Path) -> Denoiser:
    """Load the denoiser (UNet or transformer) of a diffusers folder in eval mode, with gradients off."""
    folder = inspect_model_folder(path)
    unet = SUPPORTED_DENOISERS[folder.denoiser_class_name].from_pretrained(folder.denoiser_dir,
                                                                           low_cpu_mem_usage=False)
    unet.eval().requires_grad_(False)
    return unet


def load_vae(path: str | Path) -> Autoencoder | None:
    """The autoencoder of a latent diffusion folder (``vae/`` AutoencoderKL or ``vqvae/`` VQModel) in eval mode
    with gradients off, or None when the folder has none (a pixel-space model). It stays in full precision:
    calibration works on the UNet's latent trajectories, the autoencoder only decodes samples for evaluation."""
    folder = inspect_model_folder(path)
    if folder.vae_dir is None:
        return None
    vae = SUPPORTED_VAES[folder.vae_class].from_pretrained(folder.vae_dir, low_cpu_mem_usage=False)
    vae.eval().requires_grad_(False)
    return vae


def load_scheduler_config(path: str | Path) -> dict[str, Any]:
    """The scheduler config stored with a model folder; an error naming the folder when it has none."""
    folder = inspect_model_folder(path)
    if folder.scheduler_config is None:
        raise FileNotFoundError(
            f"model folder {str(path)!r} has no scheduler/scheduler_config.json; "
            "save the pipeline with save_pretrained or add the scheduler config"
        )
    return folder.scheduler_config
