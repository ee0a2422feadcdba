"""Uniform affine quantization maths on plain tensors (no modules, no state).

Conventions (identical to ``torch.fake_quantize_per_{tensor,channel}_affine``):
``q = clamp(round(x * (1 / scale)) + zero_point, quant_min, quant_max)``, ``x_hat = (q - zero_point) * scale``,
with round-half-to-even and an integer zero point. Asymmetric ranges are ``[0, 2^b - 1]``, symmetric
ranges ``[-2^(b-1), 2^(b-1) - 1]`` with ``zero_point = 0``. ``bits == 16`` means "quantization off".
"""

from __future__ import annotations

import math

import torch

OFF_BITS = 16
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, OFF_BITS)
INIT_METHODS = ("minmax", "percentile", "mse")
MIN_SCALE = torch.finfo(torch.float32).eps
"""The smallest step size a quantizer uses: forwards clamp to it, learned step sizes are projected onto it."""


def is_off(bits: int) -> bool:
    """True when ``bits`` means "no quantization" (16)."""
    return bits >= OFF_BITS


def check_bits(bits: int, field: str = "bits") -> None:
    """Raise ``ValueError`` naming ``field`` unless ``bits`` is in 2..8 or 16."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"{field}={bits!r} is invalid: bit widths must be in 2..8, or 16 for 'off'")


def check_init_method(method: str, field: str = "method") -> None:
    """Raise ``ValueError`` unless ``method`` is a known initialisation method."""
    if method not in INIT_METHODS:
        raise ValueError(f"{field}={method!r} is not a known init method; choose one of {INIT_METHODS}")


def check_timestep_boundaries(boundaries: tuple[float, ...] | list[float], field: str = "timestep_boundaries") -> None:
    """Raise ``ValueError`` naming ``field`` unless ``boundaries`` are finite and strictly increasing."""
    values = list(boundaries)
    if any(isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) for b in values):
        raise ValueError(f"{field}={values!r}: boundaries must be finite numbers (timesteps)")
    if any(b >= c for b, c in zip(values, values[1:], strict=False)):
        raise ValueError(f"{field}={values!r}: boundaries must be strictly increasing")


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(quant_min, quant_max)`` of a ``bits``-bit quantizer."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def check_qparams(scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                  label: str = "quantizer") -> None:
    """Raise ``ValueError`` naming ``label`` and the first bad value unless every scale is finite and positive
    and every zero point lies in ``[quant_min, quant_max]``.

    A non-positive scale would be clamped to float epsilon by the forward (a layer of zeros), an out-of-range
    zero point would shift every level: both are refused rather than run."""
    bad_scale = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad_scale.any()):
        value = scale.reshape(-1)[bad_scale.reshape(-1)][0].item()
        raise ValueError(f"{label}: scale {value!r} is invalid; scales must be finite and > 0")
    zp = zero_point.to(torch.int64)
    bad_zp = (zp < quant_min) | (zp > quant_max)
    if bool(bad_zp.any()):
        value = int(zp.reshape(-1)[bad_zp.reshape(-1)][0])
        raise ValueError(f"{label}: zero point {value} is outside the integer range [{quant_min}, {quant_max}]")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through estimator)."""
    # round(x) + (x - x) rather than x + (round(x) - x): the value is exactly round(x), bit for bit.
    return torch.round(x).detach() + (x - x.detach())


def grad_scale(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Value of ``t`` with its gradient multiplied by ``factor`` (LSQ step-size gradient scaling)."""
    scaled = t * factor
    # t + (y - y) keeps the value bit-exact (t - y + y would be off by rounding errors).
    return t.detach() + (scaled - scaled.detach())


def broadcast_shape(x: torch.Tensor, axis: int | None) -> list[int]:
    """Shape that broadcasts a per-channel vector along ``axis`` of ``x`` (all ones if per-tensor)."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = x.shape[axis]
    return shape


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` (per-tensor if ``axis`` is None, else per-channel along ``axis``).

    Rounding uses the straight-through estimator, so the gradient w.r.t. ``x`` is 1 inside the integer
    range and 0 where clamped (as torch's fake_quantize), and w.r.t. ``scale`` it is the LSQ gradient.
    """
    shape = broadcast_shape(x, axis)
    return fake_quantize_broadcast(x, scale.reshape(shape), zero_point.reshape(shape), quant_min, quant_max)


def fake_quantize_broadcast(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                            quant_max: int) -> torch.Tensor:
    """:func:`fake_quantize` with ``scale`` / ``zero_point`` already shaped to broadcast against ``x`` (e.g. one
    step size per sample and channel)."""
    s, zp = scale.to(x.dtype), zero_point.to(x.dtype)
    # x * (1/s) rather than x / s: torch's kernels multiply by the inverse, which matters at rounding ties.
    q = torch.clamp(round_ste(x * (1.0 / s)) + zp, quant_min, quant_max)
    return (q - zp) * s
