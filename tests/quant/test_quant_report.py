"""docs/METHOD.md's table of quantized tensors is what the default spec quantizes on the shipped teacher."""

from __future__ import annotations

import copy

import pytest

from accuquant_pl.diffusion.loading import load_denoiser
from accuquant_pl.quant import QuantSpec, quantize
from accuquant_pl.quant.report import quantized_tensor_bits
from tests.conftest import REPO, TEACHER

SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}


def _method_table() -> dict[str, dict[str, str]]:
    text = (REPO / "docs" / "METHOD.md").read_text()
    block = text.split("<!-- quantized-tensors:start -->")[1].split("<!-- quantized-tensors:end -->")[0]
    lines = [line for line in block.strip().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header[1:], cells[1:], strict=True))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def _cell(bits: list[int]) -> str:
    return ", ".join("float" if b == 16 else str(b) for b in bits)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_the_default_spec_quantizes_exactly_the_tensors_method_lists(setting):
    w, a = SETTINGS[setting]
    walked = quantized_tensor_bits(quantize(copy.deepcopy(load_denoiser(TEACHER)), QuantSpec(weight_bits=w, act_bits=a)))
    table = _method_table()
    assert sorted(walked) == sorted(table), "tensor kinds differ between the model and docs/METHOD.md"
    assert {kind: _cell(bits) for kind, bits in walked.items()} == {kind: row[setting] for kind, row in table.items()}


def test_input_bits_shows_in_the_walk():
    walked = quantized_tensor_bits(quantize(load_denoiser(TEACHER), QuantSpec(weight_bits=4, act_bits=8, input_bits=16)))
    assert walked["network input x_t (conv_in input)"] == [16] and walked["conv_in weight"] == [8]
