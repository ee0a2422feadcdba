"""UNet conversion, activation calibration, RTN baseline, skip-split points."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention
from quant_helpers import make_cond_unet, make_unet, rel_err, unet_batches
from torch import nn

from accuquant_pl.quant import (
    ActivationQuantizer,
    LayerOverride,
    QuantAttnProcessor,
    QuantSpec,
    calibrate_activations,
    quant_state,
    quantize,
    quantized_layers,
    rtn_quantize,
)
from accuquant_pl.quant.structure import skip_split_points

MODELS = {"unet": (make_unet, False), "cond_unet": (make_cond_unet, True)}
# Random-init tiny UNets pass relative noise of ~1% per 8-bit quantized tensor almost undamped to the
# output; with ~50 quantized tensors W8A8 lands at 3-6%. The bound leaves room without hiding a bug
# (a broken grid or an unquantized-path mix-up gives errors of order 1).
W8A8_REL_BOUND = 0.12


def _inputs(cond: bool) -> dict:
    return unet_batches(1, 2, cond, seed=99)[0]


def _count_float_layers(model: nn.Module) -> int:
    return sum(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_layer_wrapped_and_processors_replaced(kind):
    make, _ = MODELS[kind]
    model = make()
    n_float = _count_float_layers(model)
    n_attn = sum(isinstance(m, Attention) for m in model.modules())
    quantize(model, QuantSpec())
    assert len(quantized_layers(model)) == n_float and _count_float_layers(model) == 0
    assert n_attn > 0 and all(isinstance(m.processor, QuantAttnProcessor)
                              for m in model.modules() if isinstance(m, Attention))
    names = {n for n, _ in quantized_layers(model)}
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"} <= names
    assert any(n.endswith("to_q") for n in names) and any("upsamplers" in n for n in names)
    for _, layer in quantized_layers(model):  # weight grids are searched at conversion
        assert not torch.all(layer.weight_quantizer.scale == 1)


@pytest.mark.parametrize("kind", list(MODELS))
def test_w8a8_close_to_fp(kind):
    make, cond = MODELS[kind]
    model = make()
    inputs = _inputs(cond)
    with torch.no_grad():
        ref = model(**inputs).sample
        rtn_quantize(model, QuantSpec(weight_bits=8, act_bits=8), unet_batches(4, 4, cond))
        out = model(**inputs).sample
        with quant_state(model, weight=False, act=False):
            off = model(**inputs).sample
    assert all(q.initialized for q in model.modules() if isinstance(q, ActivationQuantizer))
    err = rel_err(out, ref)
    assert 1e-4 < err < W8A8_REL_BOUND
    torch.testing.assert_close(off, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_w4a4_worse_than_w8a8(kind):
    make, cond = MODELS[kind]
    errs = []
    for bits in (8, 4):
        model = make()
        inputs = _inputs(cond)
        with torch.no_grad():
            ref = model(**inputs).sample
            spec = QuantSpec(weight_bits=bits, act_bits=bits, first_last_bits=bits, act_init="mse",
                             act_max_samples=4096, mse_grid=40)
            rtn_quantize(model, spec, unet_batches(2, 4, cond))
            errs.append(rel_err(model(**inputs).sample, ref))
    assert errs[1] > 3 * errs[0]


@pytest.mark.parametrize("kind", list(MODELS))
def test_sixteen_bits_reproduces_fp(kind):
    make, cond = MODELS[kind]
    model = make()
    inputs = _inputs(cond)
    with torch.no_grad():
        ref = model(**inputs).sample
        quantize(model, QuantSpec(weight_bits=16, act_bits=16, first_last_bits=16))
        out = model(**inputs).sample  # 16-bit quantizers need no calibration
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_first_last_and_overrides():
    model = make_unet()
    spec = QuantSpec(weight_bits=4, act_bits=6, overrides=[
        LayerOverride("down_blocks.0.*", weight_bits=2),
        {"pattern": r"re:.*attentions\.\d+\.processor", "act_bits": 8},
    ])
    quantize(model, spec)
    layers = dict(quantized_layers(model))
    for name in ("conv_in", "conv_out"):
        assert layers[name].weight_quantizer.bits == 8 and layers[name].input_quantizer.bits == 8
    assert layers["down_blocks.0.resnets.0.conv1"].weight_quantizer.bits == 2
    assert layers["down_blocks.0.resnets.0.conv1"].input_quantizer.bits == 6
    assert layers["down_blocks.1.resnets.0.conv1"].weight_quantizer.bits == 4
    assert layers["down_blocks.1.attentions.0.to_q"].input_quantizer.bits == 6
    proc = model.get_submodule("down_blocks.1.attentions.0.processor")
    assert proc.query_quantizer.bits == 8 and proc.probs_quantizer.bits == 8


def test_first_last_bits_keep_a_float_tensor_kind_float():
    """Weight-only W4A16: conv_in / conv_out get 8-bit weights, and their inputs stay float like every other."""
    layers = dict(quantized_layers(quantize(make_unet(), QuantSpec(weight_bits=4, act_bits=16))))
    for name in ("conv_in", "conv_out"):
        assert layers[name].weight_quantizer.bits == 8 and layers[name].input_quantizer.is_off
    layers = dict(quantized_layers(quantize(make_unet(), QuantSpec(weight_bits=16, act_bits=4))))
    assert layers["conv_in"].weight_quantizer.is_off and layers["conv_in"].input_quantizer.bits == 8


def test_unmatched_override_rejected_before_any_change():
    model = make_unet()
    spec = QuantSpec(overrides=[LayerOverride("down_blocks.0.*", 4), LayerOverride("no_such_block.*", 4)])
    with pytest.raises(ValueError, match=r"no_such_block\.\*"):
        quantize(model, spec)
    assert not quantized_layers(model)


def test_per_channel_activations_on_attention_rejected_before_any_change():
    model = make_unet()
    with pytest.raises(ValueError, match="channel axis"):
        quantize(model, QuantSpec(act_per_channel=True))
    assert not quantized_layers(model)
    quantize(model, QuantSpec(act_per_channel=True, quantize_attention_matmuls=False))
    conv = dict(quantized_layers(model))["down_blocks.0.resnets.0.conv1"]
    # per channel, within each of the 4 default timestep groups
    assert conv.input_quantizer.axis == 1 and conv.input_quantizer.scale.shape == (4, 8)


def test_unsupported_model_rejected():
    with pytest.raises(TypeError, match="UNet2DModel"):
        quantize(nn.Sequential(nn.Linear(2, 2)), QuantSpec())


def test_calibration_is_explicit_and_uses_all_batches():
    model = quantize(make_unet(), QuantSpec(act_timestep_groups=1))  # one range: the quantiles of all batches
    inputs = _inputs(False)
    with pytest.raises(RuntimeError, match="calibrate_activations"):
        model(**inputs)
    batches = unet_batches(3, 2)
    batches[1] = {"x": batches[1].pop("sample"), **batches[1]}  # the 'x' alias works too
    calibrate_activations(model, batches)
    q = model.get_submodule("conv_in.input_quantizer")
    all_x = torch.cat([b.get("sample", b.get("x")) for b in batches])
    lo, hi = all_x.quantile(1 - 0.9999), all_x.quantile(0.9999)
    assert ((q.quant_max - q.zero_point) * q.scale).item() == pytest.approx(hi.item(), rel=0.05)
    assert ((q.quant_min - q.zero_point) * q.scale).item() == pytest.approx(lo.item(), rel=0.05)


def test_rtn_with_adaround_spec_equals_plain_rtn():
    base = make_unet()
    outs = []
    for adaround in (False, True):
        model = copy.deepcopy(base)
        rtn_quantize(model, QuantSpec(weight_bits=4, act_bits=8, adaround=adaround), unet_batches(2, 2))
        with torch.no_grad():
            outs.append(model(**_inputs(False)).sample)
    assert torch.equal(outs[0], outs[1])


def _hidden_channel_hooks(model: nn.Module) -> dict[str, int]:
    """Actual hidden (non-skip) channels entering each up-block resnet, captured with hooks."""
    seen: dict[str, int] = {}
    for b, block in enumerate(model.up_blocks):
        def pre(mod, args, kwargs, b=b):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[f"up_blocks.{b}.resnets.0.conv_shortcut"] = hidden.shape[1]
        block.register_forward_pre_hook(pre, with_kwargs=True)
        for i, resnet in enumerate(block.resnets[:-1]):
            def post(mod, args, out, b=b, i=i):
                seen[f"up_blocks.{b}.resnets.{i + 1}.conv_shortcut"] = out.shape[1]
            resnet.register_forward_hook(post)
    return seen


@pytest.mark.parametrize("kind", list(MODELS))
def test_split_points_equal_actual_hidden_channels(kind):
    make, cond = MODELS[kind]
    model = make()
    points = skip_split_points(model)
    seen = _hidden_channel_hooks(model)
    shortcut_inputs = {}
    for name in points:
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: shortcut_inputs.__setitem__(name, a[0].shape[1]))
    with torch.no_grad():
        model(**_inputs(cond))
    assert points and set(points) == set(shortcut_inputs)
    for name, split in points.items():
        assert split == seen[name] and 0 < split < shortcut_inputs[name]
    quantize(model, QuantSpec())
    for name, split in points.items():
        layer = model.get_submodule(name)
        assert layer.quant_config.split == split
        assert layer.input_quantizer.num_channels == 1 and layer.input_quantizer_skip is not None


def test_split_skip_off():
    model = quantize(make_unet(), QuantSpec(split_skip=False))
    assert all(layer.input_quantizer_skip is None for _, layer in quantized_layers(model))


# ----- the network input's precision -----

@pytest.mark.parametrize("input_bits", [16, 4])
def test_input_bits_changes_exactly_the_first_layers_input_quantizer(input_bits):
    from accuquant_pl.quant import plan_layers

    base_spec = QuantSpec(weight_bits=4, act_bits=8)
    base_layers, base_processors = plan_layers(make_unet(), base_spec)
    layers, processors = plan_layers(make_unet(), QuantSpec(weight_bits=4, act_bits=8, input_bits=input_bits))
    assert processors == base_processors
    changed = {n for n in layers if layers[n] != base_layers[n]}
    assert changed == {"conv_in"}
    assert layers["conv_in"].act.bits == input_bits and layers["conv_in"].weight == base_layers["conv_in"].weight
    model = quantize(make_unet(), QuantSpec(weight_bits=4, act_bits=8, input_bits=input_bits))
    assert model.conv_in.input_quantizer.bits == input_bits
    assert model.conv_in.input_quantizer.is_off == (input_bits == 16)


def test_input_bits_is_validated_and_an_override_still_wins():
    from accuquant_pl.quant import plan_layers

    with pytest.raises(ValueError, match="input_bits=9 is invalid"):
        QuantSpec(input_bits=9)
    spec = QuantSpec(input_bits=16, overrides=[LayerOverride("conv_in", act_bits=6)])
    assert plan_layers(make_unet(), spec)[0]["conv_in"].act.bits == 6
