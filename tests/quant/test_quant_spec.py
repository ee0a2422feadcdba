"""QuantSpec validation."""

from __future__ import annotations

import pytest

from accuquant_pl.quant import LayerOverride, QuantSpec


@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "first_last_bits"])
@pytest.mark.parametrize("bad", [0, 1, 9, 12, 32])
def test_bad_bits_rejected_naming_field_and_value(field, bad):
    with pytest.raises(ValueError, match=rf"{field}={bad}\b"):
        QuantSpec(**{field: bad})


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_valid_bits(bits):
    assert QuantSpec(weight_bits=bits, act_bits=bits).weight_bits == bits


def test_bad_override_bits_named():
    with pytest.raises(ValueError, match=r"overrides\[0\]\.act_bits \(pattern 'down_blocks\.\*'\)=9 "):
        QuantSpec(overrides=[LayerOverride("down_blocks.*", act_bits=9)])


@pytest.mark.parametrize("field", ["weight_init", "act_init"])
def test_unknown_init_method(field):
    with pytest.raises(ValueError, match=rf"{field}='l1'"):
        QuantSpec(**{field: "l1"})


def test_bad_percentile():
    with pytest.raises(ValueError, match="act_percentile"):
        QuantSpec(act_percentile=1.5)


def test_dict_roundtrip_with_overrides():
    spec = QuantSpec(weight_bits=4, overrides=[{"pattern": "conv_*", "weight_bits": 8}])
    assert isinstance(spec.overrides[0], LayerOverride)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
