"""Quantization core (fake-quant, trainable): the spec, quantizers, quantized layers, UNet conversion and the
calibration-state helpers. The packed integer form lives in :mod:`accuquant_pl.deploy`."""

from .adaround import AdaRoundQuantizer
from .attention import QuantAttnProcessor
from .convert import calibrate_activations, plan_layers, quantize, rtn_quantize
from .layers import QuantConv2d, QuantLinear, harden, layer_biases, quantized_layers
from .quantizers import ActivationQuantizer, WeightQuantizer
from .spec import ActQuantConfig, LayerOverride, LayerQuantConfig, QuantSpec, WeightQuantConfig
from .state import adaround_regularizer, quant_state, set_quant_state, unit_parameters
from .structure import reconstruction_units

__all__ = [
    "ActQuantConfig",
    "ActivationQuantizer",
    "AdaRoundQuantizer",
    "LayerOverride",
    "LayerQuantConfig",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "WeightQuantConfig",
    "WeightQuantizer",
    "adaround_regularizer",
    "calibrate_activations",
    "harden",
    "layer_biases",
    "plan_layers",
    "quant_state",
    "quantize",
    "quantized_layers",
    "reconstruction_units",
    "rtn_quantize",
    "set_quant_state",
    "unit_parameters",
]
