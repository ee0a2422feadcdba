"""Packed integer storage (int4 two per byte, int8/uint8), deployed layers and the exact integer GEMM."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from accuquant_pl.deploy import DeployedConv2d, DeployedLinear
from accuquant_pl.deploy.freeze import freeze_layer
from accuquant_pl.deploy.int_matmul import affine_int_mm, int8_shift, to_int8, with_ones_row
from accuquant_pl.deploy.layers import WeightFormat
from accuquant_pl.deploy.packing import (
    pack_int4,
    pack_weight,
    storage_dtype,
    stored_numel,
    unpack_int4,
    unpack_weight,
)
from accuquant_pl.quant import LayerQuantConfig, QuantConv2d, QuantLinear
from accuquant_pl.quant.affine import quant_range
from accuquant_pl.quant.spec import ActQuantConfig, WeightQuantConfig

BIT_RANGES = [(b, s) for b in range(2, 9) for s in (False, True)]


@pytest.mark.parametrize("numel", [0, 1, 2, 3, 15, 16, 17, 33])
def test_int4_round_trip_every_value_any_length(numel):
    codes = (torch.arange(numel) * 7 % 16).to(torch.uint8)  # cycles through all 16 values
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_int4(packed, numel), codes)


def test_int4_every_pair_of_values():
    pairs = torch.tensor(list(itertools.product(range(16), repeat=2)), dtype=torch.uint8).reshape(-1)
    packed = pack_int4(pairs)
    assert packed.numel() == 256 and torch.equal(packed.sort().values, torch.arange(256, dtype=torch.uint8))
    assert torch.equal(unpack_int4(packed, pairs.numel()), pairs)
    # Low nibble = even element, high nibble = odd element (the documented layout).
    assert pack_int4(torch.tensor([3, 12], dtype=torch.uint8)).item() == 3 | (12 << 4)


@pytest.mark.parametrize(("bits", "symmetric"), BIT_RANGES)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (5, 3, 3, 3), (1, 1, 1, 1)])
def test_weight_round_trip_every_level(bits, symmetric, shape):
    qmin, qmax = quant_range(bits, symmetric)
    numel = torch.Size(shape).numel()
    levels = (qmin + torch.arange(numel) % (qmax - qmin + 1)).reshape(shape)
    stored = pack_weight(levels, bits, symmetric)
    assert stored.dtype == storage_dtype(bits, symmetric) and stored.numel() == stored_numel(numel, bits)
    assert torch.equal(unpack_weight(stored, bits, symmetric, shape).to(torch.int64), levels)


@pytest.mark.parametrize(("bits", "symmetric"), BIT_RANGES)
def test_every_level_of_the_range(bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    levels = torch.arange(qmin, qmax + 1)
    assert torch.equal(unpack_weight(pack_weight(levels, bits, symmetric), bits, symmetric, levels.shape).long(),
                       levels)


def test_out_of_range_levels_refused():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_weight(torch.tensor([0, 8]), 4, True)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([16]))
    with pytest.raises(ValueError, match="outside"):  # 6-bit levels live in uint8: a foreign byte is caught
        unpack_weight(torch.tensor([0, 64], dtype=torch.uint8), 6, False, (2,))
    with pytest.raises(ValueError, match="outside"):
        unpack_weight(pack_int4(torch.tensor([0, 9])), 3, False, (2,))


def test_foreign_storage_refused():
    with pytest.raises(ValueError, match="3 codes need 2"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="pad nibble"):
        unpack_int4(torch.tensor([0x10, 0x10], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="flat uint8"):
        unpack_int4(torch.zeros(2, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="int8"):
        unpack_weight(torch.zeros(4, dtype=torch.uint8), 8, True, (4,))
    with pytest.raises(ValueError, match="4 torch.uint8"):
        unpack_weight(torch.zeros(5, dtype=torch.uint8), 8, False, (4,))


@pytest.mark.parametrize("shift_x", [0, 128])
@pytest.mark.parametrize("shift_w", [0, 128])
def test_affine_int_mm_is_exact(shift_x, shift_w):
    g = torch.Generator().manual_seed(0)
    qx = torch.randint(0, 256 if shift_x else 128, (9, 13), generator=g)
    qw = torch.randint(0, 256 if shift_w else 128, (5, 13), generator=g)
    zx, zw = torch.tensor(37), torch.randint(0, 100, (5,), generator=g)
    x8, w8 = to_int8(qx, shift_x), to_int8(qw, shift_w)
    out = affine_int_mm(x8, (zx - shift_x).int(), with_ones_row(w8), (zw - shift_w).int(),
                        w8.sum(1, dtype=torch.int32))
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), (qx - zx) @ (qw - zw[:, None]).T)
    assert int8_shift(255) == 128 and int8_shift(127) == 0


def _quant_layer(kind: str, bits: int, symmetric: bool, split: int | None = None):
    torch.manual_seed(bits)
    act = ActQuantConfig(8)
    config = LayerQuantConfig(WeightQuantConfig(bits, symmetric, init="minmax"), act, split)
    if kind == "conv":  # odd everything: 5 -> 3 channels, 3x3 kernel, stride 2, padding 1
        layer = QuantConv2d.from_module(nn.Conv2d(5, 3, 3, stride=2, padding=1), config=config)
        x = torch.randn(2, 5, 7, 9)
    else:
        layer = QuantLinear.from_module(nn.Linear(7, 3), config=config)
        x = torch.randn(4, 2, 7)
    layer.input_quantizer.calibrate(x if split is None else x[:, :split] if kind == "conv" else x[..., :split])
    if split is not None:
        layer.input_quantizer_skip.calibrate(x[:, split:] if kind == "conv" else x[..., split:])
    return layer, x


def _deploy(layer):
    entry, tensors = freeze_layer("layer", layer)
    fmt, config = WeightFormat.from_dict(entry["weight"]), LayerQuantConfig.from_dict(entry["config"])
    deployed = (DeployedConv2d if isinstance(layer, nn.Conv2d) else DeployedLinear)(layer, fmt, config)
    state = {**{k: v for k, v in layer.state_dict().items() if not k.startswith("weight")}, **tensors}
    deployed.load_state_dict(state, strict=True)
    deployed.validate()
    return deployed.requires_grad_(False)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (3, True), (8, False), (8, True), (6, False)])
@pytest.mark.parametrize("split", [None, 2])
def test_deployed_layer_odd_shapes_match_fake_quant(kind, bits, symmetric, split):
    layer, x = _quant_layer(kind, bits, symmetric, split)
    deployed = _deploy(layer)
    with torch.no_grad():
        ref = layer(x)
        assert torch.equal(deployed(x), ref)  # dequantize on the fly: the same float op on the same values
        assert deployed.set_execution("cached") == "cached" and torch.equal(deployed(x), ref)
        assert deployed.set_execution("int") == "int", deployed.fallback_reason
        torch.testing.assert_close(deployed(x), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(deployed.weight, layer.weight_quantizer(layer.weight).detach())


def test_int_execution_falls_back_where_it_cannot_run():
    config = LayerQuantConfig(WeightQuantConfig(4, init="minmax"), ActQuantConfig(16))
    layer = QuantLinear.from_module(nn.Linear(6, 4), config=config)
    deployed = _deploy(layer)
    assert deployed.set_execution("int") == "dequant" and deployed.fallback_reason == "input is not quantized"
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(deployed(x), layer(x))
    with pytest.raises(ValueError, match="unknown execution"):
        deployed.set_execution("fast")


def test_moving_a_deployed_layer_rebuilds_its_execution_state():
    layer, x = _quant_layer("conv", 4, False)
    deployed = _deploy(layer)
    with torch.no_grad():
        ref = layer(x)
        for mode in ("cached", "int"):
            deployed.set_execution(mode)
            moved = copy.deepcopy(deployed).to(torch.float64)  # the float cache / int8 plan follow the move
            out = moved(x.double())
            assert out.dtype == torch.float64 and moved.execution == mode
            torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-5)
