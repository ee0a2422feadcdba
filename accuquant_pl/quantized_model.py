"""A self-contained quantized model folder: quantized tensors + quantization map + UNet and scheduler configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from accuquant_pl.io import atomic_directory
from accuquant_pl.models.loading import SUPPORTED_UNETS, UNet
from accuquant_pl.quant import QuantSpec, load_quantized, save_quantized

UNET_CONFIG = "unet_config.json"
SCHEDULER_CONFIG = "scheduler_config.json"


def export_quantized(model: nn.Module, folder: str | Path, spec: QuantSpec | None = None,
                     scheduler_config: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` (replaced atomically): everything :func:`load_quantized_model` needs, and nothing else."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        save_quantized(model, tmp, spec)
        (tmp / UNET_CONFIG).write_text(model.to_json_string())
        if scheduler_config is not None:
            (tmp / SCHEDULER_CONFIG).write_text(json.dumps(dict(scheduler_config), indent=2, default=list))
    return folder


def load_quantized_model(folder: str | Path) -> tuple[UNet, dict[str, Any] | None]:
    """The quantized UNet of an exported folder (eval mode, no gradients) and its scheduler config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"quantized model folder {str(folder)!r} does not exist")
    config_file = folder / UNET_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"quantized model folder {str(folder)!r} has no {UNET_CONFIG}")
    config = json.loads(config_file.read_text())
    cls_name = config.get("_class_name")
    if cls_name not in SUPPORTED_UNETS:
        raise ValueError(f"{config_file}: {cls_name!r} is not a supported UNet ({sorted(SUPPORTED_UNETS)})")
    unet = SUPPORTED_UNETS[cls_name].from_config(config)
    load_quantized(unet, folder)
    unet.eval().requires_grad_(False)
    scheduler_file = folder / SCHEDULER_CONFIG
    return unet, (json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None)
