"""Freeze a calibrated (fake-quantized) model: integer weight levels, packed, plus everything else it needs.

The integer levels are computed with the very formulas of the weight quantizers' forward (AdaRound's hardened
``floor(w / s) + rounding``, or round-to-nearest), and every frozen layer is checked to dequantize to exactly
the fake-quantized weight, so a frozen model never differs silently from the model it came from. :func:`freeze`
is the whole model's deployed form in memory (what ``export_quantized`` writes, without the folder).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from accuquant_pl.quant.adaround import AdaRoundQuantizer
from accuquant_pl.quant.affine import MIN_SCALE, broadcast_shape
from accuquant_pl.quant.attention import QuantAttnProcessor
from accuquant_pl.quant.convert import SPEC_ATTR
from accuquant_pl.quant.layers import QuantLayerMixin, quantized_layers
from accuquant_pl.quant.quantizers import ActivationQuantizer, WeightQuantizer
from accuquant_pl.quant.spec import QuantSpec

from .layers import WeightFormat
from .model import build_deployed, load_deployed_state, set_execution
from .packing import pack_weight


def weight_levels(layer: QuantLayerMixin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(levels, scale, zero_point)`` of a quantized layer's weight; levels are int32 in the weight's shape.

    ``(levels - zero_point) * scale`` (broadcast along the quantizer's axis) is the fake-quantized weight.
    """
    wq, w = layer.weight_quantizer, layer.weight.detach()
    with torch.no_grad():
        if isinstance(wq, AdaRoundQuantizer):
            if not wq.hardened:
                raise ValueError("AdaRound rounding is not hardened; call harden(model) first")
            w_floor, _, zp = wq._grid(w)  # the quantizer's own grid maths, so the levels are the ones it uses
            q = torch.clamp(w_floor + wq.rounding.to(w.dtype) + zp, wq.quant_min, wq.quant_max)
            scale = wq.scale.detach().clone()
        elif isinstance(wq, WeightQuantizer):
            scale = wq.scale.detach().clamp_min(MIN_SCALE)  # the value WeightQuantizer.forward uses
            shape = broadcast_shape(w, wq.axis)
            s, zp = scale.to(w.dtype).reshape(shape), wq.zero_point.to(w.dtype).reshape(shape)
            q = torch.clamp(torch.round(w * (1.0 / s)) + zp, wq.quant_min, wq.quant_max)
        else:
            raise TypeError(f"unknown weight quantizer {type(wq).__name__}")
    return q.to(torch.int32), scale, wq.zero_point.detach().clone()


def _check_ready(name: str, layer: nn.Module) -> None:
    weight_off = isinstance(layer, QuantLayerMixin) and not layer.weight_quant_enabled
    if weight_off or not layer.act_quant_enabled:
        raise ValueError(f"{name!r} has quantization switched off; a frozen model always quantizes "
                         "(set_quant_state(model, weight=True, act=True) first)")
    for qname, q in layer.named_modules():
        if isinstance(q, ActivationQuantizer) and not q.is_off and not bool(q.initialized):
            raise ValueError(f"activation quantizer {name}.{qname} is not calibrated; run calibrate_activations")


def freeze_layer(name: str, layer: QuantLayerMixin) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Map entry and tensors (keys relative to the layer) of one quantized layer; its input quantizers'
    tensors are not included (they keep their state-dict keys)."""
    _check_ready(name, layer)
    wq, w = layer.weight_quantizer, layer.weight.detach()
    fmt = WeightFormat(wq.bits, wq.symmetric, wq.axis, tuple(w.shape), str(w.dtype).removeprefix("torch."))
    entry = {
        "class": type(layer).__name__,
        "config": asdict(layer.quant_config),
        "weight": fmt.to_dict(),
        "rounding": "adaround" if isinstance(wq, AdaRoundQuantizer) else "nearest",
    }
    if fmt.is_off:
        return entry, {"weight_float": w.clone()}
    levels, scale, zp = weight_levels(layer)
    tensors = {"qweight": pack_weight(levels, fmt.bits, fmt.symmetric), "weight_scale": scale,
               "weight_zero_point": zp.to(fmt.zero_point_dtype)}
    with torch.no_grad():
        shape = broadcast_shape(w, wq.axis)
        dequantized = (levels.to(w.dtype) - zp.to(w.dtype).reshape(shape)) * scale.to(w.dtype).reshape(shape)
        if not torch.equal(dequantized, wq(w)):
            raise RuntimeError(f"layer {name!r}: frozen weight differs from the fake-quantized one")
    return entry, tensors


def frozen_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """``(layers, attention_processors, tensors)`` of a calibrated model: map entries and the full state.

    Every tensor of the model's state dict is kept except each quantized layer's float ``weight`` and weight
    quantizer, which become ``qweight`` / ``weight_scale`` / ``weight_zero_point`` (or ``weight_float``).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, ActivationQuantizer) and not m.is_off:
            # The step size the forward uses (a learned one can have gone below it), so that the deployed model,
            # whose loader refuses a scale that is not > 0, runs what was calibrated.
            key = f"{name}.scale" if name else "scale"
            state[key] = state[key].clamp_min(MIN_SCALE)
    layers: dict[str, Any] = {}
    for name, layer in quantized_layers(model):
        entry, tensors = freeze_layer(name, layer)
        layers[name] = entry
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k == f"{prefix}weight" or k.startswith(f"{prefix}weight_quantizer.")]:
            del state[key]
        state.update({f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in tensors.items()})
    processors = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantAttnProcessor):
            _check_ready(name, m)
            processors[name] = m.quant_map_entry()
    return layers, processors, state


def freeze(model: nn.Module, execution: str = "dequant") -> nn.Module:
    """The deployed (packed integer) form of a calibrated model, in memory, on its device; ``model`` is not modified.

    With ``execution="dequant"`` or ``"cached"`` its outputs are bit-identical to ``model``'s.
    """
    layers, processors, tensors = frozen_state(model)
    spec: QuantSpec | None = getattr(model, SPEC_ATTR, None)
    deployed = build_deployed(type(model), dict(model.config), layers, processors, spec)
    load_deployed_state(deployed, tensors)
    if spec is not None:
        setattr(deployed, SPEC_ATTR, spec)
    first = next(model.parameters(), None)
    deployed.to(first.device if first is not None else "cpu").eval().requires_grad_(False)
    set_execution(deployed, execution)
    return deployed
