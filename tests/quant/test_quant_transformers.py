"""Transformer denoisers in the quantization core: reconstruction units, first/last layers, which tensors are
quantized, the attention processors, and the UNet-only option refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accuquant_pl.quant import (
    QuantSpec,
    calibrate_activations,
    quantize,
    quantized_layers,
    reconstruction_units,
)
from accuquant_pl.quant.attention import QuantAttnProcessor
from accuquant_pl.quant.report import quantized_tensor_bits
from accuquant_pl.quant.structure import first_last_layers
from tests.tiny_models import TEXT_DIM, tiny_dit, tiny_pixart


def dit_batches(model: nn.Module, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"sample": torch.randn(4, model.config.in_channels, 8, 8, generator=g),
             "timestep": torch.tensor([100, 300, 600, 900]) + i, "class_labels": torch.tensor([0, 3, 5, 9])}
            for i in range(n)]


def pixart_batches(model: nn.Module, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"sample": torch.randn(4, 4, 8, 8, generator=g), "timestep": torch.tensor([100, 300, 600, 900]) + i,
             "encoder_hidden_states": torch.randn(4, 5, TEXT_DIM, generator=g)} for i in range(n)]


def test_dit_units_are_the_patch_embedding_the_blocks_and_the_output_projections():
    model = tiny_dit()
    assert [n for n, _ in reconstruction_units(model)] == [
        "pos_embed", "transformer_blocks.0", "transformer_blocks.1", "proj_out_1", "proj_out_2"]
    assert first_last_layers(model) == ("pos_embed.proj", "proj_out_2")
    pixart = tiny_pixart()
    assert [n for n, _ in reconstruction_units(pixart)] == [
        "pos_embed", "adaln_single", "caption_projection", "transformer_blocks.0", "transformer_blocks.1", "proj_out"]
    assert first_last_layers(pixart) == ("pos_embed.proj", "proj_out")


@pytest.mark.parametrize("make, batches", [(tiny_dit, dit_batches), (tiny_pixart, pixart_batches)])
def test_every_linear_and_conv_is_quantized_and_attention_goes_through_the_processor(make, batches):
    model = make()
    wanted = {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    q = quantize(make(), QuantSpec(weight_bits=4, act_bits=8))
    calibrate_activations(q, batches(q))
    assert {n for n, _ in quantized_layers(q)} == wanted
    processors = [n for n, m in q.named_modules() if isinstance(m, QuantAttnProcessor)]
    attentions = {n.rsplit(".", 1)[0] for n in wanted if n.endswith(".to_q")}
    assert {p.removesuffix(".processor") for p in processors} == attentions
    bits = quantized_tensor_bits(q)
    first, last = first_last_layers(q)
    assert bits[f"network input x_t ({first} input)"] == [8] and bits[f"{first} weight"] == [8]
    assert bits[f"{last} weight"] == [8] and bits["other linear weights"] == [4]
    # adaLN / timestep / class-embedding layers are quantized like the rest
    assert any(".norm1.linear" in n or "adaln_single" in n for n, _ in quantized_layers(q))


def test_quantized_dit_stays_close_to_the_float_one_at_w8a8():
    model = tiny_dit().eval()
    q = quantize(tiny_dit(), QuantSpec(weight_bits=8, act_bits=8)).eval()
    calibrate_activations(q, dit_batches(q, 4))
    b = dit_batches(model, 1)[0]
    with torch.no_grad():
        ref = model(b["sample"], b["timestep"], class_labels=b["class_labels"]).sample
        out = q(b["sample"], b["timestep"], class_labels=b["class_labels"]).sample
    assert 0 < (out - ref).norm() / ref.norm() < 0.1


def test_input_bits_changes_only_the_patch_embedding_input():
    q = quantize(tiny_dit(), QuantSpec(weight_bits=8, act_bits=8, input_bits=16))
    layers = dict(quantized_layers(q))
    assert layers["pos_embed.proj"].input_quantizer.bits == 16
    assert all(layer.input_quantizer.bits == 8 for n, layer in layers.items() if n != "pos_embed.proj")


def test_split_skip_is_a_unet_option_and_named():
    with pytest.raises(ValueError, match=r"quant.split_skip is a UNet option .*DiTTransformer2DModel"):
        quantize(tiny_dit(), QuantSpec(split_skip=True))
    quantize(tiny_dit(), QuantSpec(split_skip=False))  # off is what a transformer has anyway
