"""save_quantized / load_quantized round trips and error reporting."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from quant_helpers import make_cond_unet, make_unet, unet_batches
from safetensors.torch import load_file, save_file

from accuquant_pl.quant import (
    QuantSpec,
    calibrate_activations,
    harden,
    load_quantized,
    quantize,
    quantized_layers,
    rtn_quantize,
    save_quantized,
)

MODELS = {"unet": (make_unet, False), "cond_unet": (make_cond_unet, True)}


def _learned_adaround(make, cond: bool, spec: QuantSpec):
    fp = make()
    model = quantize(copy.deepcopy(fp), spec)
    with torch.no_grad():  # stand-in for training: arbitrary learned rounding and step sizes
        for _, layer in quantized_layers(model):
            layer.weight_quantizer.alpha.normal_(0, 2)
    calibrate_activations(model, unet_batches(2, 2, cond))
    harden(model)
    return fp, model


@pytest.mark.parametrize("kind", list(MODELS))
def test_roundtrip_bit_identical(kind, tmp_path):
    make, cond = MODELS[kind]
    spec = QuantSpec(weight_bits=4, act_bits=6, adaround=True)
    fp, model = _learned_adaround(make, cond, spec)
    save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantization_map.json", "quantized.safetensors"]
    loaded = load_quantized(copy.deepcopy(fp), tmp_path)
    inputs = unet_batches(1, 3, cond, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)
    assert loaded.accuquant_spec == model.accuquant_spec == spec.resolved(1000)


def test_map_contents_and_tensor_dtypes(tmp_path):
    fp, model = _learned_adaround(make_unet, False, QuantSpec(weight_bits=4, adaround=True))
    save_quantized(model, tmp_path)
    qmap = json.loads((tmp_path / "quantization_map.json").read_text())
    entry = qmap["layers"]["up_blocks.0.resnets.0.conv_shortcut"]
    assert entry["class"] == "QuantConv2d" and entry["hardened"] and entry["weight_axis"] == 0
    assert entry["config"]["weight"]["bits"] == 4 and entry["config"]["act"]["bits"] == 8
    assert entry["config"]["split"] == 16 and entry["act_axis"] is None
    assert qmap["layers"]["conv_in"]["config"]["weight"]["bits"] == 8
    assert "down_blocks.1.attentions.0.processor" in qmap["attention_processors"]
    assert qmap["spec"]["weight_bits"] == 4 and qmap["spec"]["adaround"] is True
    tensors = load_file(tmp_path / "quantized.safetensors")
    assert tensors["conv_in.weight_quantizer.rounding"].dtype == torch.uint8
    assert tensors["conv_in.weight_quantizer.zero_point"].dtype == torch.int32
    assert "conv_in.input_quantizer.scale" in tensors and "conv_in.weight" in tensors
    assert not any(k.endswith(".alpha") for k in tensors)


def test_rtn_roundtrip(tmp_path):
    fp = make_unet()
    model = rtn_quantize(copy.deepcopy(fp), QuantSpec(weight_bits=4, act_bits=8), unet_batches(2, 2))
    save_quantized(model, tmp_path)
    loaded = load_quantized(copy.deepcopy(fp), tmp_path)
    inputs = unet_batches(1, 2, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


def test_soft_adaround_refused(tmp_path):
    model = quantize(make_unet(), QuantSpec(adaround=True))
    with pytest.raises(ValueError, match="harden"):
        save_quantized(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_overwrite_leaves_no_temp_files(tmp_path):
    fp = make_unet()
    model = rtn_quantize(copy.deepcopy(fp), QuantSpec(), unet_batches(2, 2))
    save_quantized(model, tmp_path)
    save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantization_map.json", "quantized.safetensors"]


def _tamper(tmp_path, fn) -> None:
    path = tmp_path / "quantized.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_tensor_named(tmp_path):
    fp = make_unet()
    save_quantized(rtn_quantize(copy.deepcopy(fp), QuantSpec(), unet_batches(2, 2)), tmp_path)
    _tamper(tmp_path, lambda t: t.pop("mid_block.attentions.0.processor.probs_quantizer.scale"))
    with pytest.raises(ValueError, match=r"mid_block\.attentions\.0\.processor\.probs_quantizer\.scale"):
        load_quantized(copy.deepcopy(fp), tmp_path)


def test_shape_mismatch_named(tmp_path):
    fp = make_unet()
    save_quantized(rtn_quantize(copy.deepcopy(fp), QuantSpec(), unet_batches(2, 2)), tmp_path)
    _tamper(tmp_path, lambda t: t.__setitem__("conv_out.weight_quantizer.scale", torch.ones(3)))
    with pytest.raises(ValueError, match=r"conv_out\.weight_quantizer\.scale"):
        load_quantized(copy.deepcopy(fp), tmp_path)


def test_map_layer_missing_from_model(tmp_path):
    fp = make_unet()
    save_quantized(rtn_quantize(copy.deepcopy(fp), QuantSpec(), unet_batches(2, 2)), tmp_path)
    path = tmp_path / "quantization_map.json"
    qmap = json.loads(path.read_text())
    qmap["layers"]["extra_block.proj"] = qmap["layers"]["conv_in"]
    path.write_text(json.dumps(qmap))
    with pytest.raises(ValueError, match="extra_block.proj"):
        load_quantized(copy.deepcopy(fp), tmp_path)
