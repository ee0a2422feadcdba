"""Save / load quantized models: ``quantized.safetensors`` + ``quantization_map.json``.

Soft (un-hardened) AdaRound quantizers are refused by :func:`save_quantized`: V is a training-time
variable, a saved model is meant to be final. Call ``harden(model)`` first. Reloading rebuilds the
quantized structure from the JSON map on a fresh float model and loads the tensors; no forward pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from accuquant_pl.io import atomic_path, atomic_write_text

from .adaround import AdaRoundQuantizer
from .attention import QuantAttnProcessor
from .convert import SPEC_ATTR, apply_plan
from .layers import QUANT_CLASSES, QUANT_LAYERS, quantized_layers
from .spec import ActQuantConfig, LayerQuantConfig, QuantSpec

WEIGHTS_NAME = "quantized.safetensors"
MAP_NAME = "quantization_map.json"
FORMAT = "accuquant-pl/quantization-map"
VERSION = 1


def quantization_map(model: nn.Module, spec: QuantSpec | None = None) -> dict[str, Any]:
    """JSON-serialisable description of every quantized layer and processor (+ the spec)."""
    spec = spec or getattr(model, SPEC_ATTR, None)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_class": type(model).__name__,
        "spec": spec.to_dict() if spec is not None else None,
        "layers": {n: m.quant_map_entry() for n, m in quantized_layers(model)},
        "attention_processors": {
            n: m.quant_map_entry() for n, m in model.named_modules() if isinstance(m, QuantAttnProcessor)
        },
    }


def _check_hardened(model: nn.Module) -> None:
    soft = [n for n, m in model.named_modules()
            if isinstance(m, AdaRoundQuantizer) and not m.hardened and not m.is_off]
    if soft:
        raise ValueError(f"cannot save soft AdaRound quantizers {soft}; call harden(model) first")


def save_quantized(model: nn.Module, folder: str | os.PathLike, spec: QuantSpec | None = None) -> None:
    """Write ``quantized.safetensors`` (every tensor of the state dict) and ``quantization_map.json``.

    Both files are written atomically. Raises ``ValueError`` if any AdaRound quantizer is still soft.
    """
    _check_hardened(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    qmap = quantization_map(model, spec)
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT})
    atomic_write_text(folder / MAP_NAME, json.dumps(qmap, indent=2))


def _read_map(folder: Path) -> dict[str, Any]:
    qmap = json.loads((folder / MAP_NAME).read_text())
    if qmap.get("format") != FORMAT or qmap.get("version") != VERSION:
        raise ValueError(f"{folder / MAP_NAME}: not an {FORMAT} v{VERSION} file")
    return qmap


def _plan_from_map(model: nn.Module, qmap: dict[str, Any]) -> tuple[dict, dict]:
    layers: dict[str, LayerQuantConfig] = {}
    float_of = {q: f for f, q in QUANT_LAYERS.items()}
    for name, entry in qmap["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"layer {name!r} of the quantization map does not exist in the model") from err
        expected = float_of[QUANT_CLASSES[entry["class"]]]
        if type(module) is not expected:
            raise ValueError(f"layer {name!r}: map expects {expected.__name__}, model has {type(module).__name__}")
        layers[name] = LayerQuantConfig.from_dict(entry["config"])
    processors = {n: ActQuantConfig(**e["config"]) for n, e in qmap["attention_processors"].items()}
    return layers, processors


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"tensor mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"tensor {k!r}: saved shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}")


def load_quantized(fp_model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Rebuild the quantized structure on ``fp_model`` (in place) from the map and load all tensors."""
    folder = Path(folder)
    qmap = _read_map(folder)
    layers, processors = _plan_from_map(fp_model, qmap)
    apply_plan(fp_model, layers, processors, init_weights=False)
    for name, entry in qmap["layers"].items():
        if entry["hardened"]:
            layer = fp_model.get_submodule(name)
            layer.weight_quantizer.mark_hardened(tuple(layer.weight.shape))
    device = next(fp_model.parameters()).device
    tensors = load_file(folder / WEIGHTS_NAME, device=str(device))
    _check_tensors(fp_model, tensors)
    fp_model.load_state_dict(tensors, strict=True)
    if qmap["spec"] is not None:
        setattr(fp_model, SPEC_ATTR, QuantSpec.from_export(qmap["spec"]))
    return fp_model
