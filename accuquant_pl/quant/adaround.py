"""AdaRound weight quantizer (Nagel et al., 2020): learned up/down rounding on a fixed per-channel grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .affine import broadcast_shape, check_bits, is_off, quant_range
from .quantizers import CheckedQParams
from .range_init import channel_rows, init_qparams

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """Soft rounding ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """``V`` such that ``h(V) = h`` for ``h`` in [0, 1) (the stretch keeps the logit finite)."""
    return -torch.log((zeta - gamma) / (h - gamma) - 1.0)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound regulariser ``sum(1 - |2h - 1|^beta)``: 0 once every ``h`` is binary."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


@dataclass(frozen=True)
class AdaRoundSchedule:
    """Maps an iteration to ``(beta, regulariser weight)``.

    During the first ``warmup`` fraction of ``total_iters`` the regulariser is off (weight 0, beta at
    ``start_beta``); afterwards beta decays linearly from ``start_beta`` to ``end_beta`` and the weight
    is ``reg_weight``.
    """

    total_iters: int
    reg_weight: float = 0.01
    warmup: float = 0.2
    start_beta: float = 20.0
    end_beta: float = 2.0

    def __call__(self, iteration: int) -> tuple[float, float]:
        """``(beta, weight)`` at ``iteration`` (0-based)."""
        start = self.warmup * self.total_iters
        if iteration < start:
            return self.start_beta, 0.0
        progress = (iteration - start) / max(self.total_iters - start, 1e-12)
        beta = self.end_beta + (self.start_beta - self.end_beta) * max(0.0, 1.0 - progress)
        return beta, self.reg_weight


class AdaRoundQuantizer(CheckedQParams, nn.Module):
    """Per-channel (``axis``) AdaRound weight quantizer.

    The grid (``scale``, ``zero_point`` buffers) comes from an MSE search at :meth:`init_from_weight` and
    stays fixed. ``alpha`` (V, an ``nn.Parameter``) parametrises soft rounding ``floor(w/s) + h(V)``.
    ``soft`` selects soft (training) or hard (``h >= 0.5``) rounding while V exists. :meth:`harden` fixes
    the rounding into the ``rounding`` uint8 buffer (0 = floor, 1 = ceil) and drops V.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = 0,
                 weight_shape: tuple[int, ...] = (1,), device: torch.device | str | None = None) -> None:
        super().__init__()
        check_bits(bits)
        self.bits, self.symmetric, self.axis = bits, symmetric, axis
        self.quant_min, self.quant_max = quant_range(bits, symmetric)
        shape = (weight_shape[axis],) if axis is not None else ()
        self.register_buffer("scale", torch.ones(shape, device=device))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32, device=device))
        self.alpha: nn.Parameter | None = nn.Parameter(torch.zeros(weight_shape, device=device))
        self.register_buffer("rounding", None)
        self.soft = True

    @property
    def is_off(self) -> bool:
        """True for 16-bit (identity) quantizers."""
        return is_off(self.bits)

    @property
    def hardened(self) -> bool:
        """True once the rounding is fixed (V dropped)."""
        return self.alpha is None

    def _grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = broadcast_shape(w, self.axis)
        s = self.scale.to(w.dtype).reshape(shape)
        zp = self.zero_point.to(w.dtype).reshape(shape)
        return torch.floor(w * (1.0 / s)), s, zp

    def init_from_weight(self, weight: torch.Tensor, method: str = "mse", *, percentile: float = 0.9999,
                         grid: int = 80) -> None:
        """Search the grid for ``weight`` and set V so that ``h(V) = w/s - floor(w/s)``."""
        if self.is_off:
            return
        w = weight.detach()
        scale, zp = init_qparams(channel_rows(w, self.axis), method, self.bits, self.symmetric,
                                 percentile=percentile, grid=grid)
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zp.reshape(self.zero_point.shape))
        w_floor, s, _ = self._grid(w)
        with torch.no_grad():
            self.alpha = nn.Parameter(inverse_rectified_sigmoid(w * (1.0 / s) - w_floor).to(w.dtype))

    def soft_rounding(self) -> torch.Tensor:
        """``h(V)`` in [0, 1]; only valid before hardening."""
        if self.alpha is None:
            raise RuntimeError("AdaRoundQuantizer is hardened: V no longer exists")
        return rectified_sigmoid(self.alpha)

    def regularizer(self, beta: float) -> torch.Tensor:
        """Rounding regulariser of this layer (0 once hardened)."""
        if self.alpha is None or self.is_off:
            return self.scale.new_zeros(())
        return rounding_regularizer(self.soft_rounding(), beta)

    @torch.no_grad()
    def harden(self, weight: torch.Tensor, method: str = "learned") -> None:
        """Fix the rounding: ``learned`` (``h(V) >= 0.5``) or ``nearest`` (plain round-to-nearest)."""
        if method == "nearest":
            w_floor, s, _ = self._grid(weight)
            up = torch.round(weight * (1.0 / s)) - w_floor
        elif method == "learned":
            if self.alpha is None:
                raise RuntimeError("AdaRoundQuantizer is already hardened")
            up = self.alpha >= 0  # h(V) >= 0.5  <=>  V >= 0, the same test as hard mode
        else:
            raise ValueError(f"unknown hardening method {method!r}; use 'learned' or 'nearest'")
        self.rounding = up.to(torch.uint8)
        self.alpha = None

    def mark_hardened(self, weight_shape: tuple[int, ...]) -> None:
        """Give the quantizer the hardened structure (zeros, to be overwritten by a state dict load)."""
        self.rounding = torch.zeros(weight_shape, dtype=torch.uint8, device=self.scale.device)
        self.alpha = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight with soft, hard-thresholded, or hardened rounding."""
        if self.is_off:
            return weight
        w_floor, s, zp = self._grid(weight)
        if self.alpha is None:
            up = self.rounding.to(weight.dtype)
        elif self.soft:
            up = self.soft_rounding()
        else:
            up = (self.alpha >= 0).to(weight.dtype)  # h(V) >= 0.5  <=>  V >= 0
        q = torch.clamp(w_floor + up + zp, self.quant_min, self.quant_max)
        return (q - zp) * s

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, axis={self.axis}, hardened={self.hardened}"
