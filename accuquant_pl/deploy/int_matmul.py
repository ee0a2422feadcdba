"""Integer GEMM with affine zero points on ``torch._int_mm`` (int8 x int8 -> int32, CPU and CUDA).

With ``x_hat = (qx - zx) * sx`` and ``w_hat = (qw - zw) * sw`` the product over ``k`` is
``sx * sw * (sum qx qw - zw sum qx - zx sum qw + K zx zw)``; the bracket is computed exactly in int32 and
only the final rescale is floating point. Levels of an asymmetric 8-bit range (0..255) do not fit int8, so
they are shifted by 128 first (the zero point shifts with them, the bracket is unchanged).
"""

from __future__ import annotations

import torch

INT32_SAFE_K = 32767
"""Largest reduction length whose four int32 terms (each at most ``K * 128 * 128``) cannot overflow."""


def int8_shift(quant_max: int) -> int:
    """Shift that maps a quantizer's levels into int8: 128 for ranges above 127 (asymmetric 8-bit), else 0."""
    return 128 if quant_max > 127 else 0


def to_int8(levels: torch.Tensor, shift: int) -> torch.Tensor:
    """Integer-valued tensor (any dtype) minus ``shift``, as int8."""
    return (levels - shift).to(torch.int8)


def with_ones_row(w: torch.Tensor) -> torch.Tensor:
    """``[N + 1, K]`` int8: ``w`` plus a row of ones, so that one ``_int_mm`` also yields the row sums of x."""
    return torch.cat([w, w.new_ones(1, w.shape[1])])


def affine_int_mm(x: torch.Tensor, zx: torch.Tensor, w_ext: torch.Tensor, zw: torch.Tensor,
                  w_sum: torch.Tensor) -> torch.Tensor:
    """Exact ``sum_k (x[m, k] - zx) (w[n, k] - zw[n])`` as int32 ``[M, N]``.

    Args:
        x: int8 ``[M, K]`` activation levels (shifted into int8).
        zx: int32 scalar tensor, the activation zero point (same shift).
        w_ext: int8 ``[N + 1, K]`` weight levels (shifted into int8) from :func:`with_ones_row`; passed
            transposed, as ``_int_mm`` accepts.
        zw: int32 ``[N]`` weight zero points (same shift).
        w_sum: int32 ``[N]``, ``w.sum(1)`` precomputed once per layer.
    """
    k = x.shape[1]
    if k > INT32_SAFE_K:
        raise ValueError(f"reduction length {k} could overflow int32; use dequantized execution")
    acc = torch._int_mm(x, w_ext.t())
    # The ones row gives sum_k x[m, k] from the same GEMM (a separate int8 sum would upcast and copy x).
    acc, x_sum = acc[:, :-1], acc[:, -1:]
    return acc - x_sum * zw + (k * zw - w_sum) * zx
