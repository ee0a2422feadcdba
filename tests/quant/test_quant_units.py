"""Reconstruction units: forward order, exact coverage of quantized layers, per-unit parameters."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import make_cond_unet, make_unet, unet_batches

from accuquant_pl.quant import (
    ActivationQuantizer,
    AdaRoundQuantizer,
    QuantSpec,
    adaround_regularizer,
    harden,
    quantize,
    quantized_layers,
    reconstruction_units,
    unit_parameters,
)

MODELS = {"unet": (make_unet, False), "cond_unet": (make_cond_unet, True)}


@pytest.mark.parametrize("kind", list(MODELS))
def test_units_in_forward_order(kind):
    make, cond = MODELS[kind]
    model = make()
    units = reconstruction_units(model)
    order: list[str] = []
    for name, module in units:
        module.register_forward_pre_hook(lambda m, a, name=name: order.append(name) if name not in order else None)
    with torch.no_grad():
        model(**unet_batches(1, 2, cond)[0])
    assert order == [n for n, _ in units]
    assert units[0][0] == "time_embedding" and "conv_in" in order[:3] and units[-1][0] == "conv_out"


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_quantized_module_in_exactly_one_unit(kind):
    make, _ = MODELS[kind]
    model = quantize(make(), QuantSpec(adaround=True))
    units = reconstruction_units(model)
    owners: dict[int, list[str]] = {}
    for name, unit in units:
        for m in unit.modules():
            owners.setdefault(id(m), []).append(name)
    layers = quantized_layers(model)
    quantizers = [m for m in model.modules() if isinstance(m, (ActivationQuantizer, AdaRoundQuantizer))]
    assert layers and quantizers
    for name, layer in layers:
        assert len(owners.get(id(layer), [])) == 1, name
    for q in quantizers:
        assert len(owners.get(id(q), [])) == 1, q.name
    # parameters of the units partition all quantization parameters
    per_unit = [p for _, u in units for ps in unit_parameters(u).values() for p in ps]
    assert len(per_unit) == len({id(p) for p in per_unit})
    assert {id(p) for p in per_unit} == {id(p) for ps in unit_parameters(model).values() for p in ps}


def test_unit_parameters_and_hardening_one_unit():
    model = quantize(make_unet(), QuantSpec(weight_bits=4, adaround=True))
    units = dict(reconstruction_units(model))
    attn = units["down_blocks.1.attentions.0"]
    groups = unit_parameters(attn)
    # to_q, to_k, to_v, to_out.0 -> 4 AdaRound V; their inputs + q, k, probs, v -> 8 step sizes
    assert len(groups["adaround"]) == 4 and len(groups["act_scale"]) == 8 and groups["weight_scale"] == []
    assert adaround_regularizer(attn, 2.0) > 0
    harden(attn)
    assert unit_parameters(attn)["adaround"] == [] and adaround_regularizer(attn, 2.0) == 0
    assert unit_parameters(units["mid_block.attentions.0"])["adaround"]  # other units untouched


def test_rtn_spec_exposes_weight_scales():
    model = quantize(make_unet(), QuantSpec(weight_bits=4))
    groups = unit_parameters(dict(reconstruction_units(model))["conv_in"])
    assert groups["adaround"] == [] and len(groups["weight_scale"]) == 1 and len(groups["act_scale"]) == 1
