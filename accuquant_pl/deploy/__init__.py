"""The deployed form: packed integer weights, integer layers, the exported folder (one format) and pipelines."""

from accuquant_pl.deploy.artifact import (
    export_quantized,
    exported_sampler,
    exported_scheduler_config,
    load_quantized,
)
from accuquant_pl.deploy.freeze import freeze
from accuquant_pl.deploy.layers import EXECUTION_MODES, DeployedConv2d, DeployedLinear
from accuquant_pl.deploy.model import set_execution, weight_bytes
from accuquant_pl.deploy.pipelines import quantized_pipeline

__all__ = [
    "EXECUTION_MODES",
    "DeployedConv2d",
    "DeployedLinear",
    "export_quantized",
    "exported_sampler",
    "exported_scheduler_config",
    "freeze",
    "load_quantized",
    "quantized_pipeline",
    "set_execution",
    "weight_bytes",
]
