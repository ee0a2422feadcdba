"""Initial quantization ranges from observed values: min-max, percentile and an MSE search over clipping ratios.

The functions work on a channels-last 2-D view ``rows: [N, C]`` (``C = 1`` for per-tensor), so per-tensor and
per-channel share one vectorised code path.
"""

from __future__ import annotations

import math

import torch

from .affine import MIN_SCALE, check_init_method, quant_range

_MSE_CHUNK_ELEMS = 2**24  # floats per MSE-search chunk (64 MiB in float32)


def channel_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Channels-last 2-D view ``[N, C]`` of ``x`` (``C = 1`` when ``axis`` is None)."""
    if axis is None:
        return x.reshape(-1, 1)
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


def minmax_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point whose grid covers ``[min_val, max_val]`` (widened to include 0)."""
    qmin, qmax = quant_range(bits, symmetric)
    min_val = min_val.float().clamp(max=0.0)
    max_val = max_val.float().clamp(min=0.0)
    if symmetric:
        # Divide by qmax so the positive end is not clipped; the extra negative level stays unused.
        scale = (torch.maximum(-min_val, max_val) / qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((max_val - min_val) / (qmax - qmin)).clamp_min(MIN_SCALE)
    zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def init_minmax(rows: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max initialisation per column of ``rows [N, C]``."""
    return minmax_qparams(rows.amin(dim=0), rows.amax(dim=0), bits, symmetric)


def _kth(rows: torch.Tensor, q: float) -> torch.Tensor:
    # kthvalue instead of torch.quantile: quantile refuses inputs above 16M elements.
    k = min(max(int(math.ceil(q * rows.shape[0])), 1), rows.shape[0])
    return rows.kthvalue(k, dim=0).values


def init_percentile(
    rows: torch.Tensor, bits: int, symmetric: bool, percentile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip at the ``percentile`` (in (0, 1]) of each column (of ``|x|`` if symmetric)."""
    rows = rows.float()
    if symmetric:
        amax = _kth(rows.abs(), percentile)
        return minmax_qparams(-amax, amax, bits, symmetric)
    return minmax_qparams(_kth(rows, 1.0 - percentile), _kth(rows, percentile), bits, symmetric)


def _grid_errors(rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 norm: float) -> torch.Tensor:
    """Errors ``[G, C]`` of ``rows [N, C]`` under ``G`` candidate grids ``scale, zero_point [G, C]``."""
    s, zp = scale.unsqueeze(1), zero_point.unsqueeze(1).to(rows.dtype)
    q = torch.clamp(torch.round(rows * (1.0 / s)) + zp, qmin, qmax)  # same formula as fake_quantize
    return ((q - zp) * s - rows).abs().pow(norm).mean(dim=1)


def init_mse(
    rows: torch.Tensor,
    bits: int,
    symmetric: bool,
    grid: int = 80,
    min_ratio: float = 0.2,
    min_val: torch.Tensor | None = None,
    max_val: torch.Tensor | None = None,
    norm: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Search clipping ratios ``linspace(1, min_ratio, grid)`` of the min-max range, best error per column.

    Vectorised over channels and over chunks of the grid (chunks bound the memory to about
    ``_MSE_CHUNK_ELEMS`` floats). Ratio 1 (plain min-max) is always a candidate and ties keep the larger
    range, so the result never has a larger error than min-max. ``min_val``/``max_val`` override the
    range (e.g. running extremes when ``rows`` is only a sample).
    """
    rows = rows.float()
    qmin, qmax = quant_range(bits, symmetric)
    lo = (rows.amin(dim=0) if min_val is None else min_val.float()).unsqueeze(0)
    hi = (rows.amax(dim=0) if max_val is None else max_val.float()).unsqueeze(0)
    ratios = torch.linspace(1.0, min_ratio, grid, device=rows.device).unsqueeze(1)
    chunk = max(1, _MSE_CHUNK_ELEMS // max(rows.numel(), 1))
    best = None
    with torch.no_grad():
        for r in ratios.split(chunk):
            scale, zp = minmax_qparams(lo * r, hi * r, bits, symmetric)  # [g, C]
            err = _grid_errors(rows, scale, zp, qmin, qmax, norm)
            idx = err.argmin(dim=0, keepdim=True)  # first minimum: ties keep the larger range
            cand = (err.gather(0, idx)[0], scale.gather(0, idx)[0], zp.gather(0, idx)[0])
            if best is None:
                best = cand
            else:
                better = cand[0] < best[0]
                best = tuple(torch.where(better, c, b) for c, b in zip(cand, best, strict=True))
    return best[1], best[2]


def init_qparams(rows: torch.Tensor, method: str, bits: int, symmetric: bool, *, percentile: float = 0.9999,
                 grid: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to :func:`init_minmax`, :func:`init_percentile` or :func:`init_mse`."""
    check_init_method(method)
    if method == "minmax":
        return init_minmax(rows, bits, symmetric)
    if method == "percentile":
        return init_percentile(rows, bits, symmetric, percentile)
    return init_mse(rows, bits, symmetric, grid)
