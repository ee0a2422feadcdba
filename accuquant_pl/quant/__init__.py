"""Quantization core: quantizers, quantized layers, UNet conversion, calibration state and serialization."""

from .adaround import AdaRoundQuantizer, AdaRoundSchedule, rectified_sigmoid, rounding_regularizer
from .attention import QuantAttnProcessor, install_quant_processor
from .convert import calibrate_activations, plan_layers, quantize, rtn_quantize
from .layers import QUANT_LAYERS, QuantConv2d, QuantLayerMixin, QuantLinear, harden, quantized_layers
from .quantizers import ActivationQuantizer, WeightQuantizer, fake_quantize, quant_range
from .serialization import load_quantized, quantization_map, save_quantized
from .spec import ActQuantConfig, LayerOverride, LayerQuantConfig, QuantSpec, WeightQuantConfig
from .state import (
    adaround_regularizer,
    observing,
    quant_state,
    set_adaround_soft,
    set_quant_state,
    unit_parameters,
)
from .unet import reconstruction_units, skip_split_points

__all__ = [
    "QUANT_LAYERS",
    "ActQuantConfig",
    "ActivationQuantizer",
    "AdaRoundQuantizer",
    "AdaRoundSchedule",
    "LayerOverride",
    "LayerQuantConfig",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLayerMixin",
    "QuantLinear",
    "QuantSpec",
    "WeightQuantConfig",
    "WeightQuantizer",
    "adaround_regularizer",
    "calibrate_activations",
    "fake_quantize",
    "harden",
    "install_quant_processor",
    "load_quantized",
    "observing",
    "plan_layers",
    "quant_range",
    "quant_state",
    "quantization_map",
    "quantize",
    "quantized_layers",
    "reconstruction_units",
    "rectified_sigmoid",
    "rounding_regularizer",
    "rtn_quantize",
    "save_quantized",
    "set_adaround_soft",
    "set_quant_state",
    "skip_split_points",
    "unit_parameters",
]
