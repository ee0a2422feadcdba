"""accuquant-pl: AccuQuant post-training quantization of diffusion models with PyTorch Lightning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public entry points for deployed models, imported on first use: ``import accuquant_pl`` stays light
# (no diffusers / safetensors import) for code that only needs a submodule.
_LAZY = {
    "load_quantized": ("accuquant_pl.quantized_model", "load_quantized_unet"),
    "load_quantized_model": ("accuquant_pl.quantized_model", "load_quantized_model"),
    "export_quantized": ("accuquant_pl.quantized_model", "export_quantized"),
    "quantized_pipeline": ("accuquant_pl.quantized_model", "quantized_pipeline"),
    "freeze": ("accuquant_pl.quant.deployed_model", "freeze"),
    "set_execution": ("accuquant_pl.quant.deployed_model", "set_execution"),
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'accuquant_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
