"""Which tensors a quantized model quantizes, at which bit widths: read off the converted model itself.

This is the table docs/METHOD.md shows for the default spec (and its test compares the two), so that users can
match our setting against a deployment toolchain's.
"""

from __future__ import annotations

from torch import nn

from .attention import QuantAttnProcessor
from .layers import quantized_layers
from .structure import first_last_layers


def _layer_kinds(name: str, layer: nn.Module, first_last: tuple[str, str]) -> tuple[str, str]:
    """(weight kind, input kind) of a quantized layer."""
    if name == first_last[0]:
        return f"{name} weight", f"network input x_t ({name} input)"
    if name == first_last[1]:
        return f"{name} weight", f"{name} input"
    kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
    inputs = "skip-concat conv inputs (two ranges)" if getattr(layer, "input_quantizer_skip", None) is not None \
        else f"other {kind} inputs"
    return f"other {kind} weights", inputs


def quantized_tensor_bits(model: nn.Module) -> dict[str, list[int]]:
    """``{tensor kind: sorted distinct bit widths}`` over the whole model (16 means kept in float)."""
    found: dict[str, set[int]] = {}
    first_last = first_last_layers(model)
    for name, layer in quantized_layers(model):
        weight_kind, input_kind = _layer_kinds(name, layer, first_last)
        found.setdefault(weight_kind, set()).add(layer.weight_quantizer.bits)
        found.setdefault(input_kind, set()).add(layer.input_quantizer.bits)
        skip = getattr(layer, "input_quantizer_skip", None)
        if skip is not None:
            found[input_kind].add(skip.bits)
    for m in model.modules():
        if isinstance(m, QuantAttnProcessor):
            found.setdefault("attention q, k (QK^T operands)", set()).update(
                (m.query_quantizer.bits, m.key_quantizer.bits))
            found.setdefault("attention probabilities (softmax output)", set()).add(m.probs_quantizer.bits)
            found.setdefault("attention v", set()).add(m.value_quantizer.bits)
    return {kind: sorted(bits) for kind, bits in sorted(found.items())}
