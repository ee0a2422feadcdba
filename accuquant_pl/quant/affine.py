"""Uniform affine quantization maths on plain tensors (no modules, no state).

Conventions (identical to ``torch.fake_quantize_per_{tensor,channel}_affine``):
``q = clamp(round(x * (1 / scale)) + zero_point, quant_min, quant_max)``, ``x_hat = (q - zero_point) * scale``,
with round-half-to-even and an integer zero point. Asymmetric ranges are ``[0, 2^b - 1]``, symmetric
ranges ``[-2^(b-1), 2^(b-1) - 1]`` with ``zero_point = 0``. ``bits == 16`` means "quantization off".
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

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
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Fake-quantize ``x`` (per-tensor if ``axis`` is None, else per-channel along ``axis``).

    Rounding uses the straight-through estimator, so the gradient w.r.t. ``x`` is 1 inside the integer
    range and 0 where clamped (as torch's fake_quantize), and w.r.t. ``scale`` it is the LSQ gradient times
    ``grad_factor`` (see :class:`FakeQuantizeLSQ`).
    """
    shape = broadcast_shape(x, axis)
    return fake_quantize_broadcast(x, scale.reshape(shape), zero_point.reshape(shape), quant_min, quant_max,
                                   grad_factor)


def _levels(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, quant_min: int, quant_max: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x / s`` (as ``x * (1/s)``: torch's kernels multiply by the inverse, which matters at rounding ties), its
    rounded integer level ``r + zp`` before clamping, and the clamped level ``q``."""
    v = x * (1.0 / s)
    level = torch.round(v) + zp
    return v, level, torch.clamp(level, quant_min, quant_max)


class FakeQuantizeLSQ(torch.autograd.Function):
    """Fake quantization as one autograd node: the straight-through gradient for ``x`` and the LSQ gradient for
    ``scale`` (Esser et al., 2020), scaled by ``grad_factor``.

    The forward is the arithmetic of the no-grad path (bit for bit). Written as a chain of differentiable ops
    (round with a straight-through term, clamp, two products, a gradient-scaling term) the same maths records
    about fifteen graph nodes and saves three full-size float tensors per call; this node saves ``x / s`` alone
    (one float per element) and its backward recomputes the levels from it:

    - d out / d x = 1 where the rounded level lies in ``[quant_min, quant_max]``, else 0;
    - d out / d s = (q - zp) - x/s inside the range, (q - zp) outside (q the clamped level), summed over the
      elements that share a step size (``sum_to_size`` onto ``scale``'s broadcast shape).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,  # noqa: ANN001
                quant_max: int, grad_factor: float) -> torch.Tensor:
        s, zp = scale.to(x.dtype), zero_point.to(x.dtype)
        v, _, q = _levels(x, s, zp, quant_min, quant_max)
        ctx.save_for_backward(v, zp)
        ctx.bounds, ctx.grad_factor, ctx.scale_shape, ctx.scale_dtype = (quant_min, quant_max), grad_factor, \
            scale.shape, scale.dtype
        return (q - zp) * s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        v, zp = ctx.saved_tensors
        level = torch.round(v) + zp
        q = torch.clamp(level, *ctx.bounds)
        inside = level == q  # the clamp left the level alone
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            q -= zp
            lsq = torch.where(inside, q - v, q)
            # summed in float32 also under autocast (a no-op for float32 tensors)
            grad_s = (grad.float() * lsq.float()).sum_to_size(ctx.scale_shape) * ctx.grad_factor
            grad_s = grad_s.to(ctx.scale_dtype)
        return grad_x, grad_s, None, None, None, None


def fake_quantize_broadcast(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                            quant_max: int, grad_factor: float = 1.0) -> torch.Tensor:
    """:func:`fake_quantize` with ``scale`` / ``zero_point`` already shaped to broadcast against ``x`` (e.g. one
    step size per sample and channel)."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return FakeQuantizeLSQ.apply(x, scale, zero_point, quant_min, quant_max, grad_factor)
    s, zp = scale.to(x.dtype), zero_point.to(x.dtype)
    return (_levels(x, s, zp, quant_min, quant_max)[2] - zp) * s
