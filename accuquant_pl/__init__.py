"""accuquant-pl: AccuQuant post-training quantization of diffusion models with PyTorch Lightning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public entry points for deployed models, imported on first use: ``import accuquant_pl`` stays light
# (no diffusers / safetensors import) for code that only needs a submodule.
_LAZY = {
    "load_quantized": "accuquant_pl.deploy.artifact",
    "export_quantized": "accuquant_pl.deploy.artifact",
    "exported_sampler": "accuquant_pl.deploy.artifact",
    "exported_scheduler_config": "accuquant_pl.deploy.artifact",
    "quantized_pipeline": "accuquant_pl.deploy.pipelines",
    "export_onnx": "accuquant_pl.deploy.onnx_export",
    "OnnxDenoiser": "accuquant_pl.deploy.onnx_runtime",
    "freeze": "accuquant_pl.deploy.freeze",
    "set_execution": "accuquant_pl.deploy.model",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'accuquant_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
