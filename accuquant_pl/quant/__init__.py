"""Quantization core: quantizers, quantized layers, UNet conversion, calibration state, serialization and the
packed integer (deployed) form."""

from .adaround import AdaRoundQuantizer, AdaRoundSchedule, rectified_sigmoid, rounding_regularizer
from .attention import QuantAttnProcessor, install_quant_processor
from .convert import calibrate_activations, plan_layers, quantize, rtn_quantize
from .deployed import EXECUTION_MODES, DeployedConv2d, DeployedLayer, DeployedLinear, WeightFormat
from .deployed_model import (
    build_deployed,
    deployed_layers,
    freeze,
    load_deployed_state,
    set_execution,
    weight_bytes,
)
from .freeze import frozen_state, weight_levels
from .layers import (
    QUANT_LAYERS,
    QuantConv2d,
    QuantLayerMixin,
    QuantLinear,
    harden,
    layer_biases,
    quantized_layers,
)
from .packing import pack_int4, pack_weight, unpack_int4, unpack_weight
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
    "EXECUTION_MODES",
    "QUANT_LAYERS",
    "ActQuantConfig",
    "ActivationQuantizer",
    "AdaRoundQuantizer",
    "AdaRoundSchedule",
    "DeployedConv2d",
    "DeployedLayer",
    "DeployedLinear",
    "LayerOverride",
    "LayerQuantConfig",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLayerMixin",
    "QuantLinear",
    "QuantSpec",
    "WeightQuantConfig",
    "WeightFormat",
    "WeightQuantizer",
    "adaround_regularizer",
    "build_deployed",
    "calibrate_activations",
    "deployed_layers",
    "fake_quantize",
    "freeze",
    "frozen_state",
    "harden",
    "layer_biases",
    "install_quant_processor",
    "load_deployed_state",
    "load_quantized",
    "observing",
    "pack_int4",
    "pack_weight",
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
    "set_execution",
    "set_quant_state",
    "skip_split_points",
    "unit_parameters",
    "unpack_int4",
    "unpack_weight",
    "weight_bytes",
    "weight_levels",
]
