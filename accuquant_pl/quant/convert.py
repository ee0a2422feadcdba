"""Model conversion: ``quantize``, explicit activation calibration and the round-to-nearest baseline."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from accuquant_pl.denoisers import check_denoiser, is_transformer

from .affine import is_off
from .attention import install_quant_processor
from .layers import QUANT_LAYERS, harden
from .quantizers import ActivationQuantizer
from .spec import LayerOverride, LayerQuantConfig, QuantSpec
from .state import observing
from .structure import first_last_layers, skip_split_points
from .timesteps import attach_timestep_router

SPEC_ATTR = "accuquant_spec"
"""Attribute under which :func:`quantize` records the spec on the model (read by serialization)."""


DEFAULT_TRAIN_TIMESTEPS = 1000
"""diffusers' default ``num_train_timesteps`` (DDPMScheduler), used to resolve ``act_timestep_groups`` when the
caller does not give the model's own."""


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _resolve_bits(name: str, spec: QuantSpec, base: tuple[int, int], used: set[int]) -> tuple[int, int]:
    """(weight_bits, act_bits) of module ``name`` after the overrides (later overrides win)."""
    w_bits, a_bits = base
    for i, o in enumerate(spec.overrides):
        if _matches(o.pattern, name):
            used.add(i)
            w_bits = o.weight_bits if o.weight_bits is not None else w_bits
            a_bits = o.act_bits if o.act_bits is not None else a_bits
    return w_bits, a_bits


def _check_overrides_used(overrides: list[LayerOverride], used: set[int]) -> None:
    unused = [o.pattern for i, o in enumerate(overrides) if i not in used]
    if unused:
        raise ValueError(f"override pattern(s) {unused} match no quantizable layer or attention processor")


def plan_layers(model: nn.Module, spec: QuantSpec, num_train_timesteps: int = DEFAULT_TRAIN_TIMESTEPS
                ) -> tuple[dict[str, LayerQuantConfig], dict[str, Any]]:
    """Per-layer configs for every ``nn.Conv2d``/``nn.Linear`` and act configs for every attention
    processor, without touching the model. Raises on override patterns that match nothing.
    ``num_train_timesteps`` resolves ``spec.act_timestep_groups`` (a spec with explicit boundaries needs none)."""
    check_denoiser(model)
    spec = spec.resolved(num_train_timesteps)
    if is_transformer(model) and spec.split_skip is True:
        raise ValueError(f"quant.split_skip is a UNet option (its skip concatenations); {type(model).__name__} has "
                         "none: leave split_skip unset")
    splits = skip_split_points(model) if spec.split_skip is not False else {}
    input_layer, output_layer = first_last_layers(model)
    used: set[int] = set()
    layers: dict[str, LayerQuantConfig] = {}
    processors: dict[str, Any] = {}
    for name, module in model.named_modules():
        if type(module) in QUANT_LAYERS:
            base = (spec.weight_bits, spec.act_bits)
            if name in (input_layer, output_layer) and spec.first_last_bits is not None:
                # Higher precision for the first and last layers where the rest is quantized: a float (16-bit)
                # tensor, e.g. every activation of a weight-only W4A16 spec, stays float.
                base = tuple(b if is_off(b) else spec.first_last_bits for b in base)
            if name == input_layer and spec.input_bits is not None:
                base = (base[0], spec.input_bits)
            w_bits, a_bits = _resolve_bits(name, spec, base, used)
            layers[name] = LayerQuantConfig(spec.weight_config(w_bits), spec.act_config(a_bits), splits.get(name))
        elif isinstance(module, Attention) and spec.quantize_attention_matmuls:
            pname = f"{name}.processor"
            _, a_bits = _resolve_bits(pname, spec, (spec.weight_bits, spec.act_bits), used)
            processors[pname] = spec.act_config(a_bits)
    _check_overrides_used(spec.overrides, used)
    if processors and spec.act_per_channel:
        # Checked here, before any module is swapped, so a bad spec never leaves a half-converted model.
        raise ValueError(
            f"act_per_channel=True but attention matmul operands (e.g. {next(iter(processors))}) have no "
            "channel axis; set act_per_channel=False or quantize_attention_matmuls=False"
        )
    return layers, processors


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_plan(model: nn.Module, layers: dict[str, LayerQuantConfig], processors: dict[str, Any],
               init_weights: bool = True) -> None:
    """Swap in quantized layers and processors as planned (weights' grids searched if ``init_weights``)."""
    for name, config in layers.items():
        float_module = model.get_submodule(name)
        qcls = QUANT_LAYERS[type(float_module)]
        set_submodule(model, name, qcls.from_module(float_module, config=config, init_weights=init_weights))
    for pname, act_config in processors.items():
        attn_name = pname.rpartition(".")[0]
        install_quant_processor(model.get_submodule(attn_name), act_config, attn_name)
    for name, m in model.named_modules():
        if isinstance(m, ActivationQuantizer):
            m.name = name
    attach_timestep_router(model)


def quantize(model: nn.Module, spec: QuantSpec, num_train_timesteps: int = DEFAULT_TRAIN_TIMESTEPS) -> nn.Module:
    """Quantize a diffusers ``UNet2DModel``/``UNet2DConditionModel`` in place and return it.

    Every ``nn.Conv2d``/``nn.Linear`` becomes a quantized layer whose weight grid is initialised now
    (weights are known); activation quantizers stay uninitialised until :func:`calibrate_activations`.
    Attention processors are replaced when ``spec.quantize_attention_matmuls``. ``num_train_timesteps`` (the
    scheduler config's) turns ``spec.act_timestep_groups`` into boundaries; the model records the resolved spec.
    """
    spec = spec.resolved(num_train_timesteps)
    layers, processors = plan_layers(model, spec)
    apply_plan(model, layers, processors)
    setattr(model, SPEC_ATTR, spec)
    return model


def _forward_kwargs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    if "x" in batch:  # alias used by the data module
        batch["sample"] = batch.pop("x")
    if is_transformer(model) and "sample" in batch:  # the transformers' name for it
        batch["hidden_states"] = batch.pop("sample")
    return batch


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[dict[str, Any]], method: str | None = None) -> None:
    """Initialise every activation quantizer of ``model`` from the statistics of ``batches``.

    Each batch is a dict of forward kwargs (``sample`` or ``x``, ``timestep``, optionally
    ``encoder_hidden_states`` / ``class_labels``). Activations are observed unquantized; weights are
    fake-quantized according to the current switches. ``method`` overrides each quantizer's init method.
    """
    with observing(model) as quantizers:
        for q in quantizers:
            q.reset_observations()
        for batch in batches:
            model(**_forward_kwargs(model, batch))
    missing = [q.name if q.num_groups == 1 else f"{q.name} timestep {q.group_range(g)}"
               for q in quantizers for g in q.unobserved_groups()]
    if missing:
        hint = ("; every timestep group needs calibration inputs at its timesteps (fit the spec's "
                "act_timestep_groups / act_timestep_boundaries to the sampler's timesteps, or calibrate on more "
                "inputs, e.g. a larger act_calibration_samples)"
                if any(q.num_groups > 1 for q in quantizers) else "")
        raise RuntimeError(f"activation quantizers saw no data during calibration: {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''}{hint}")
    for q in quantizers:
        q.init_from_observations(method)


def rtn_quantize(model: nn.Module, spec: QuantSpec, calibration_batches: Iterable[dict[str, Any]],
                 num_train_timesteps: int = DEFAULT_TRAIN_TIMESTEPS) -> nn.Module:
    """Round-to-nearest baseline: :func:`quantize` + :func:`calibrate_activations`, no optimisation.

    With ``spec.adaround`` the AdaRound quantizers are hardened to nearest rounding (identical to RTN).
    """
    quantize(model, spec, num_train_timesteps)
    if spec.adaround:
        harden(model, "nearest")
    calibrate_activations(model, calibration_batches)
    return model
