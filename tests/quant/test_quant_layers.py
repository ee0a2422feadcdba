"""Quantized layers: from_module, registry, switches, split input quantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accuquant_pl.quant import (
    AdaRoundQuantizer,
    LayerQuantConfig,
    QuantConv2d,
    QuantLinear,
    quant_state,
    set_quant_state,
    unit_parameters,
)
from accuquant_pl.quant.layers import QUANT_LAYERS
from accuquant_pl.quant.spec import ActQuantConfig, WeightQuantConfig


def test_registry_maps_float_types():
    assert QUANT_LAYERS[nn.Conv2d] is QuantConv2d and QUANT_LAYERS[nn.Linear] is QuantLinear


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_from_module_shares_parameters_and_matches_manual_fake_quant(kind):
    if kind == "conv":
        fm, x = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(2, 4, 9, 9)
        qm = QuantConv2d.from_module(fm, weight_bits=4, act_bits=8)
    else:
        fm, x = nn.Linear(5, 3), torch.randn(2, 7, 5)
        qm = QuantLinear.from_module(fm, weight_bits=4, act_bits=8)
    assert qm.weight is fm.weight and qm.bias is fm.bias
    qm.input_quantizer.calibrate(x)
    wq = torch.fake_quantize_per_channel_affine(fm.weight, qm.weight_quantizer.scale.detach(),
                                                qm.weight_quantizer.zero_point, 0, 0, 15)
    aq = qm.input_quantizer
    xq = torch.fake_quantize_per_tensor_affine(x, aq.scale.detach().reshape(1), aq.zero_point.reshape(1), 0, 255)
    ref = fm._conv_forward(xq, wq, fm.bias) if kind == "conv" else nn.functional.linear(xq, wq, fm.bias)
    torch.testing.assert_close(qm(x), ref, rtol=0, atol=1e-6)
    with torch.no_grad(), quant_state(qm, weight=False, act=False):
        torch.testing.assert_close(qm(x), fm(x), rtol=0, atol=0)


def test_switches_are_per_module_and_context_restores():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    for name in ("0", "1.0", "1.1"):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, QuantLinear.from_module(model.get_submodule(name), 8, 8))
    set_quant_state(model[1], act=False)
    assert model[0].act_quant_enabled and not model[1][0].act_quant_enabled and not model[1][1].act_quant_enabled
    with quant_state(model, weight=False, act=True):
        assert all(m.act_quant_enabled and not m.weight_quant_enabled for m in (model[0], model[1][0]))
    assert model[0].act_quant_enabled and not model[1][0].act_quant_enabled and model[1][0].weight_quant_enabled


def test_forward_before_activation_init_raises():
    qm = QuantLinear.from_module(nn.Linear(3, 3), 8, 8)
    with pytest.raises(RuntimeError, match="before initialisation"):
        qm(torch.randn(2, 3))


def test_split_input_quantizers_are_independent():
    conv = nn.Conv2d(6, 4, 1)
    config = LayerQuantConfig(WeightQuantConfig(8), ActQuantConfig(4, init="minmax"), split=2)
    qm = QuantConv2d.from_module(conv, config=config)
    hidden, skip = torch.randn(3, 2, 4, 4) * 100, torch.randn(3, 4, 4, 4) * 0.01
    qm.input_quantizer.calibrate(hidden)
    qm.input_quantizer_skip.calibrate(skip)
    x = torch.cat([hidden, skip], dim=1)
    with quant_state(qm, weight=False):
        out = qm(x)
    xq = torch.cat([qm.input_quantizer(hidden), qm.input_quantizer_skip(skip)], dim=1)
    torch.testing.assert_close(out, conv(xq), rtol=0, atol=0)
    # the small-valued skip half keeps its resolution: a shared quantizer would zero it out
    assert (xq[:, 2:] - skip).abs().max() < 0.01


def test_split_point_must_be_inside_channels():
    config = LayerQuantConfig(split=6)
    with pytest.raises(ValueError, match="split point 6"):
        QuantConv2d.from_module(nn.Conv2d(6, 4, 1), config=config)


def test_unit_parameters_groups():
    fm = nn.Linear(4, 4)
    config = LayerQuantConfig(WeightQuantConfig(4, adaround=True), ActQuantConfig(8))
    qm = QuantLinear.from_module(fm, config=config)
    groups = unit_parameters(qm)
    assert isinstance(qm.weight_quantizer, AdaRoundQuantizer)
    assert groups["adaround"] == [qm.weight_quantizer.alpha]
    assert groups["act_scale"] == [qm.input_quantizer.scale] and groups["weight_scale"] == []
    assert all(p is not fm.weight for ps in groups.values() for p in ps)
    qm.harden()
    assert unit_parameters(qm)["adaround"] == []


def _adaround_linear() -> QuantLinear:
    torch.manual_seed(0)
    config = LayerQuantConfig(WeightQuantConfig(4, adaround=True), ActQuantConfig(8))
    layer = QuantLinear.from_module(nn.Linear(6, 5), config=config)
    layer.requires_grad_(False)
    return layer


def test_a_frozen_quantized_weight_is_computed_once_and_equals_a_fresh_one():
    layer = _adaround_linear()
    first = layer.quantized_weight()
    assert layer.quantized_weight() is first  # nothing can change it: reused
    assert torch.equal(first, layer.weight_quantizer(layer.weight))  # bit for bit what the quantizer computes
    layer.harden("learned")
    hardened = layer.quantized_weight()
    assert hardened is not first and torch.equal(hardened, layer.weight_quantizer(layer.weight))
    with torch.no_grad():
        layer.weight.add_(0.5)  # an in-place change (an optimiser step, a state-dict load) bumps the version
    moved = layer.quantized_weight()
    assert moved is not hardened and torch.equal(moved, layer.weight_quantizer(layer.weight))
    with torch.no_grad():
        layer.weight_quantizer.scale.mul_(2)
    assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(layer.weight))
    assert not torch.equal(layer.quantized_weight(), moved)


def test_a_weight_being_calibrated_is_quantized_on_every_forward_with_its_gradient():
    layer = _adaround_linear()
    layer.weight_quantizer.alpha.requires_grad_(True)
    a, b = layer.quantized_weight(), layer.quantized_weight()
    assert a is not b and a.grad_fn is not None
    a.sum().backward()
    assert layer.weight_quantizer.alpha.grad is not None
    layer.weight_quantizer.soft = False  # hard-thresholded V: another function of the same tensors
    with torch.no_grad():
        hard = layer.quantized_weight()
    assert torch.equal(hard, layer.weight_quantizer(layer.weight)) and not torch.equal(hard, a.detach())


def test_a_weight_quantized_under_inference_mode_is_not_kept_for_autograd_later():
    layer = _adaround_linear()
    with torch.inference_mode():
        inside = layer.quantized_weight()
    assert inside.is_inference()
    outside = layer.quantized_weight()
    assert not outside.is_inference() and torch.equal(outside, inside)
    x = torch.randn(3, 6, requires_grad=True)
    torch.nn.functional.linear(x, outside).sum().backward()  # usable by autograd
    assert x.grad is not None
