"""Quantized ``nn.Conv2d`` / ``nn.Linear`` and the float-type -> quantized-type registry.

The quantized layers subclass the float ones and share the float module's ``weight``/``bias``
Parameters, so state-dict keys of the float weights do not change.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .adaround import AdaRoundQuantizer
from .frozen_conv import frozen_weight_conv2d
from .quantizers import ActivationQuantizer, WeightQuantizer
from .spec import ActQuantConfig, LayerQuantConfig, WeightQuantConfig
from .state import QuantStateMixin


def make_weight_quantizer(cfg: WeightQuantConfig, weight: torch.Tensor) -> nn.Module:
    """Uninitialised RTN or AdaRound quantizer for ``weight`` (per output channel = axis 0)."""
    axis = 0 if cfg.per_channel else None
    if cfg.adaround:
        return AdaRoundQuantizer(cfg.bits, cfg.symmetric, axis, tuple(weight.shape), device=weight.device)
    return WeightQuantizer(cfg.bits, cfg.symmetric, axis, weight.shape[0], device=weight.device)


def make_act_quantizer(cfg: ActQuantConfig, num_channels: int | None, axis: int | None,
                       device: torch.device | str | None = None) -> ActivationQuantizer:
    """Uninitialised activation quantizer; ``num_channels=None`` means the tensor has no channel axis."""
    if cfg.per_channel and num_channels is None:
        raise ValueError("per-channel activation quantization requested for a tensor without a channel axis")
    return ActivationQuantizer(
        cfg.bits, cfg.symmetric, axis if cfg.per_channel else None, num_channels if cfg.per_channel else 1,
        cfg.init, cfg.percentile, cfg.mse_grid, cfg.max_samples, device=device,
        timestep_boundaries=cfg.timestep_boundaries,
    )


class QuantLayerMixin(QuantStateMixin):
    """Weight quantizer + input-activation quantizer(s) around a float layer's computation."""

    channel_axis: int  # channel axis of the layer input
    quant_config: LayerQuantConfig

    def _attach_quantizers(self, config: LayerQuantConfig, in_channels: int, init_weights: bool) -> None:
        self._init_quant_state()
        self._frozen_weight: tuple[tuple, torch.Tensor] | None = None  # see quantized_weight
        self.quant_config = config
        w, act, split = self.weight, config.act, config.split
        self.weight_quantizer = make_weight_quantizer(config.weight, w)
        if init_weights:
            self.weight_quantizer.init_from_weight(w, config.weight.init, percentile=config.weight.percentile,
                                                   grid=config.weight.mse_grid)
        if split is not None and not 0 < split < in_channels:
            raise ValueError(f"split point {split} outside (0, {in_channels}) input channels")
        first = in_channels if split is None else split
        self.input_quantizer = make_act_quantizer(act, first, self.channel_axis, w.device)
        self.input_quantizer_skip = (
            None if split is None else make_act_quantizer(act, in_channels - split, self.channel_axis, w.device)
        )

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Input with activation fake-quantization applied (split along channels if configured)."""
        enabled = self.act_quant_enabled
        if self.input_quantizer_skip is None:
            return self.input_quantizer(x, enabled)
        split = self.quant_config.split
        hidden, skip = x.split([split, x.shape[self.channel_axis] - split], dim=self.channel_axis)
        return torch.cat([self.input_quantizer(hidden, enabled), self.input_quantizer_skip(skip, enabled)],
                         dim=self.channel_axis)

    def quantized_weight(self) -> torch.Tensor:
        """Weight used in the forward: fake-quantized if weight quantization is enabled.

        While no gradient can reach the weight or its quantizer (a hardened unit, a unit not yet calibrated, the
        final stage, any no-grad forward), the fake-quantized weight is a constant of the tensors it is computed
        from. It is then computed once and reused until one of them changes (their identity, version counter,
        device or dtype, and the quantizer's rounding mode): the same values, bit for bit, without the per-forward
        quantization arithmetic. The cost is one float copy of each such layer's weight.
        """
        if not self.weight_quant_enabled:
            return self.weight
        wq = self.weight_quantizer
        tensors = [self.weight, *wq.parameters(), *wq.buffers()]
        # Not under inference_mode either: a tensor made there cannot be used by autograd outside it.
        if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or torch.is_inference_mode_enabled():
            return wq(self.weight)
        key = (tuple((id(t), t._version, t.device, t.dtype) for t in tensors), getattr(wq, "soft", None),
               getattr(wq, "hardened", None), torch.is_autocast_enabled(self.weight.device.type))
        if self._frozen_weight is None or self._frozen_weight[0] != key:
            with torch.no_grad():
                self._frozen_weight = (key, wq(self.weight))
        return self._frozen_weight[1]

    def harden(self, method: str = "learned") -> None:
        """Fix AdaRound rounding (no-op for round-to-nearest or already hardened quantizers)."""
        wq = self.weight_quantizer
        if isinstance(wq, AdaRoundQuantizer) and not wq.hardened and not wq.is_off:
            wq.harden(self.weight.detach(), method)

    def quant_map_entry(self) -> dict[str, Any]:
        """Description of this layer for the JSON quantization map."""
        wq = self.weight_quantizer
        return {
            "class": type(self).__name__,
            "config": asdict(self.quant_config),
            "weight_axis": wq.axis,
            "act_axis": self.input_quantizer.axis,
            "hardened": isinstance(wq, AdaRoundQuantizer) and wq.hardened,
        }


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input."""

    channel_axis = 1

    @classmethod
    def from_module(cls, module: nn.Conv2d, weight_bits: int = 8, act_bits: int = 8, *,
                    config: LayerQuantConfig | None = None, init_weights: bool = True) -> QuantConv2d:
        """Quantized layer sharing ``module``'s parameters; ``config`` overrides the bit-width shortcut."""
        config = config or LayerQuantConfig(WeightQuantConfig(weight_bits), ActQuantConfig(act_bits))
        # Built on the meta device so no throw-away weight is allocated and randomly initialised.
        q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode, device="meta")
        q.weight, q.bias = module.weight, module.bias
        q._attach_quantizers(config, module.in_channels, init_weights)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.quantize_input(x), self.quantized_weight()
        out = frozen_weight_conv2d(self, x, weight)  # a constant weight: a cheaper backward (frozen_conv.py)
        return self._conv_forward(x, weight, self.bias) if out is None else out


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input."""

    channel_axis = -1

    @classmethod
    def from_module(cls, module: nn.Linear, weight_bits: int = 8, act_bits: int = 8, *,
                    config: LayerQuantConfig | None = None, init_weights: bool = True) -> QuantLinear:
        """Quantized layer sharing ``module``'s parameters; ``config`` overrides the bit-width shortcut."""
        config = config or LayerQuantConfig(WeightQuantConfig(weight_bits), ActQuantConfig(act_bits))
        q = cls(module.in_features, module.out_features, module.bias is not None, device="meta")
        q.weight, q.bias = module.weight, module.bias
        q._attach_quantizers(config, module.in_features, init_weights)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


QUANT_LAYERS: dict[type[nn.Module], type[QuantLayerMixin]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
"""Float module type -> quantized module type (exact type match)."""

QUANT_CLASSES: dict[str, type[QuantLayerMixin]] = {c.__name__: c for c in QUANT_LAYERS.values()}
"""Quantized class name (as stored in the quantization map) -> class."""


def quantized_layers(module: nn.Module) -> list[tuple[str, QuantLayerMixin]]:
    """All quantized layers under ``module`` as ``(name, layer)`` in ``named_modules`` order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantLayerMixin)]


def layer_biases(module: nn.Module) -> list[nn.Parameter]:
    """The float biases of the quantized layers under ``module`` (kept in full precision when deployed, so a
    calibration may correct them for the quantization error they sit behind)."""
    return [layer.bias for _, layer in quantized_layers(module) if layer.bias is not None]


def harden(module: nn.Module, method: str = "learned") -> None:
    """Harden every AdaRound quantizer under ``module`` (``learned`` or ``nearest`` rounding)."""
    for _, layer in quantized_layers(module):
        layer.harden(method)
