"""The two ONNX operators of a quantized graph, as PyTorch functions that trace to them: ``QuantizeLinear`` and
``DequantizeLinear``.

Each is a ``torch.autograd.Function`` whose ``forward`` computes in PyTorch what the operator computes (so the
traced export-form model runs, and can be compared with the runtime) and whose ``symbolic`` is what the TorchScript
ONNX exporter writes. Levels travel in their 8-bit container (uint8 for ranges starting at 0, int8 for signed
ones); a range narrower than its container (4-bit activations) is a ``Clip`` on the levels, so that one graph
form serves every bit width and the runtime's integer kernels still see 8-bit tensors.
"""

from __future__ import annotations

import torch


def container_dtype(quant_min: int) -> torch.dtype:
    """The 8-bit integer type that holds a range starting at ``quant_min``."""
    return torch.int8 if quant_min < 0 else torch.uint8


def _container_range(dtype: torch.dtype) -> tuple[int, int]:
    return (-128, 127) if dtype == torch.int8 else (0, 255)


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


class Quantize(torch.autograd.Function):
    """``x`` float -> levels ``clamp(round(x / scale) + zero_point, quant_min, quant_max)`` in the zero point's
    8-bit type (per tensor, or per channel along ``axis``); ONNX ``QuantizeLinear`` (+ ``Clip`` for a narrow range)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min: int, quant_max: int, axis: int | None):  # noqa: ANN001, ANN205
        s, zp = _broadcast(scale, x, axis), _broadcast(zero_point, x, axis)
        # x * (1 / s), as the fake quantizers: the deployed PyTorch model's levels, which the runtime's division can
        # only differ from at exact rounding ties.
        q = torch.clamp(torch.round(x * (1.0 / s)) + zp.to(x.dtype), quant_min, quant_max)
        return q.to(zero_point.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point, quant_min: int, quant_max: int, axis: int | None):  # noqa: ANN001, ANN205
        kwargs = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kwargs)
        dtype = torch.int8 if quant_min < 0 else torch.uint8
        if (quant_min, quant_max) != _container_range(dtype):
            lo = g.op("Constant", value_t=torch.tensor(quant_min, dtype=dtype))
            hi = g.op("Constant", value_t=torch.tensor(quant_max, dtype=dtype))
            q = g.op("Clip", q, lo, hi)
        return q


class Dequantize(torch.autograd.Function):
    """Levels -> ``(q - zero_point) * scale`` (per tensor, or per channel along ``axis``); ONNX ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis: int | None):  # noqa: ANN001, ANN205
        s, zp = _broadcast(scale, q, axis), _broadcast(zero_point, q, axis)
        return (q.to(s.dtype) - zp.to(s.dtype)) * s

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis: int | None):  # noqa: ANN001, ANN205
        kwargs = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)



class ZeroPointPixel(torch.autograd.Function):
    """``[B, 1, C]`` levels all equal to the zero point (the level of 0.0) for ``[B, P, C]`` levels: the zero padding
    that the gathered patches read. ONNX: the zero point expanded to that shape."""

    @staticmethod
    def forward(ctx, levels, zero_point):  # noqa: ANN001, ANN205
        return zero_point.reshape(1, 1, 1).expand(levels.shape[0], 1, levels.shape[2]).contiguous()

    @staticmethod
    def symbolic(g, levels, zero_point):  # noqa: ANN001, ANN205
        shape = g.op("Shape", levels)
        one = g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64))
        batch = g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([0])), one)
        channels = g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([2])),
                        g.op("Constant", value_t=torch.tensor([3])))
        return g.op("Expand", zero_point, g.op("Concat", batch, one, channels, axis_i=0))
