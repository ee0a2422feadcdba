"""The fake-quantization modules: the weight (round-to-nearest) and LSQ activation quantizers.

Their maths is :mod:`.affine` (conventions there); their range initialisation :mod:`.range_init`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .affine import (
    MIN_SCALE,
    broadcast_shape,
    check_bits,
    check_init_method,
    check_qparams,
    check_timestep_boundaries,
    fake_quantize,
    fake_quantize_broadcast,
    is_off,
    quant_range,
)
from .observers import TensorObserver
from .range_init import channel_rows, init_mse, init_percentile, init_qparams, minmax_qparams


class CheckedQParams:
    """Mixin of the quantizers that hold ``scale`` / ``zero_point`` / ``quant_min`` / ``quant_max``: a state-dict
    load is followed by :func:`check_qparams` (skipped on the meta device and where ``holds_qparams`` is False)."""

    @property
    def holds_qparams(self) -> bool:
        """True when ``scale``/``zero_point`` are in use (so must be valid)."""
        return not self.is_off

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if f"{prefix}scale" in state_dict and not self.scale.is_meta and self.holds_qparams:
            check_qparams(self.scale.detach(), self.zero_point, self.quant_min, self.quant_max,
                          f"{type(self).__name__} {prefix.rstrip('.')!r}")


class _AffineQuantizer(CheckedQParams, nn.Module):
    """Shared state of a uniform affine quantizer: bits, range, learnable ``scale``, integer ``zero_point``."""

    def __init__(self, bits: int, symmetric: bool, axis: int | None, num_channels: int,
                 device: torch.device | str | None = None, groups: int = 1) -> None:
        super().__init__()
        check_bits(bits)
        self.bits, self.symmetric, self.axis = bits, symmetric, axis
        self.quant_min, self.quant_max = quant_range(bits, symmetric)
        # One (scale, zero point) set per group (timestep groups of activation quantizers), then per channel.
        shape = ((groups,) if groups > 1 else ()) + ((num_channels,) if axis is not None else ())
        self.scale = nn.Parameter(torch.ones(shape, device=device))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32, device=device))

    @property
    def is_off(self) -> bool:
        """True for 16-bit (identity) quantizers."""
        return is_off(self.bits)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Copy ``scale``/``zero_point`` into this quantizer (keeps its device, dtype and Parameter); invalid
        values (see :func:`check_qparams`) raise ``ValueError``."""
        check_qparams(scale, zero_point, self.quant_min, self.quant_max, self._label())
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))

    def _lsq_factor(self, elements: int, groups: int = 1) -> float:
        # LSQ: scale the step-size gradient by 1/sqrt(N * Qp), N = elements sharing one step size (per
        # sample for activations), so step sizes learn at a rate comparable to the other parameters.
        n = max(elements // max(self.scale.numel() // groups, 1), 1)
        return 1.0 / math.sqrt(n * max(self.quant_max, 1))

    def _label(self) -> str:
        return type(self).__name__

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, axis={self.axis}"


class WeightQuantizer(_AffineQuantizer):
    """Round-to-nearest weight quantizer, per-output-channel (``axis=0``) or per-tensor (``axis=None``).

    ``scale`` is an ``nn.Parameter`` (LSQ-style learnable); it is set explicitly by :meth:`init_from_weight`.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = 0, num_channels: int = 1,
                 device: torch.device | str | None = None) -> None:
        super().__init__(bits, symmetric, axis, num_channels, device)

    def init_from_weight(self, weight: torch.Tensor, method: str = "mse", *, percentile: float = 0.9999,
                         grid: int = 80) -> None:
        """Initialise scale/zero point from the (known) float weight."""
        if self.is_off:
            return
        rows = channel_rows(weight.detach(), self.axis)
        self.set_qparams(*init_qparams(rows, method, self.bits, self.symmetric, percentile=percentile, grid=grid))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight."""
        if self.is_off:
            return weight
        return fake_quantize(weight, self.scale.clamp_min(MIN_SCALE), self.zero_point, self.quant_min, self.quant_max,
                             self.axis, self._lsq_factor(weight.numel()))


class ActivationQuantizer(_AffineQuantizer):
    """LSQ activation quantizer with explicit, statistics-based initialisation.

    Life cycle: ``observe(x)`` over calibration batches (or ``forward`` while ``observing`` is True) ->
    ``init_from_observations()`` -> forward quantizes. A forward that quantizes before initialisation
    raises ``RuntimeError``; initialisation never happens as a side effect of a forward.
    Statistics: running min/max (exact) plus a bounded, approximately uniform sample of values used by
    the percentile and MSE methods (``max_samples`` values).

    Timestep groups: with ``timestep_boundaries`` ``b_1 < ... < b_{G-1}`` the quantizer holds ``G`` step sizes
    (and zero points); a sample at timestep ``t`` uses group ``#{i: b_i <= t}``. The timestep comes from
    ``timestep_source`` (a :class:`~accuquant_pl.quant.timesteps.TimestepRouter` that the model's forward
    fills), one per sample or one for the batch; statistics and initialisation are per group.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None, num_channels: int = 1,
                 init_method: str = "percentile", percentile: float = 0.9999, grid: int = 80,
                 max_samples: int = 65536, device: torch.device | str | None = None,
                 timestep_boundaries: tuple[float, ...] | list[float] = ()) -> None:
        check_timestep_boundaries(timestep_boundaries)
        boundaries = tuple(float(b) for b in timestep_boundaries)
        super().__init__(bits, symmetric, axis, num_channels, device, groups=len(boundaries) + 1)
        self.timestep_boundaries = boundaries
        check_init_method(init_method, "init_method")
        self.init_method, self.percentile, self.grid = init_method, percentile, grid
        self.num_channels, self.max_samples = num_channels, max_samples
        self.register_buffer("initialized", torch.tensor(is_off(bits), device=device))
        # Python mirror of the buffer: reading a CUDA bool on every forward would synchronise the device.
        self._ready = is_off(bits)
        self.observing = False
        self.name = ""  # set by the converter; only used in error messages
        self.observers: list[TensorObserver | None] = [None] * self.num_groups
        self.timestep_source = None  # set by attach_timestep_router when there are groups
        self._boundary_tensors: dict[torch.device, torch.Tensor] = {}

    @property
    def num_groups(self) -> int:
        """Number of timestep groups (1 = one range for every timestep)."""
        return len(self.timestep_boundaries) + 1

    @property
    def observer(self) -> TensorObserver | None:
        """Statistics of the single group (use ``observers`` when there are timestep groups)."""
        if self.num_groups != 1:  # not AttributeError: nn.Module.__getattr__ would replace this message
            raise RuntimeError(f"{self._label()} has {self.num_groups} timestep groups; read .observers")
        return self.observers[0]

    def group_range(self, group: int) -> str:
        """Human-readable timestep range of ``group`` (for messages)."""
        b = self.timestep_boundaries
        lo = f"{b[group - 1]:g} <= " if group > 0 else ""
        hi = f" < {b[group]:g}" if group < len(b) else ""
        return f"group {group} ({lo}t{hi})"

    def groups_of(self, x: torch.Tensor) -> torch.Tensor:
        """Timestep group of each row of ``x``'s batch axis: ``[1]`` when the batch shares its timestep, else
        ``[x.shape[0]]`` (a batch of ``B`` timesteps is repeated over ``x.shape[0] // B`` consecutive rows: the
        attention heads that diffusers folds into the batch axis)."""
        if self.timestep_source is None:
            raise RuntimeError(f"{self._label()} has timestep groups but no timestep source: it runs inside a "
                               "model prepared by quantize() / load_quantized(), whose forward provides the timestep")
        t = self.timestep_source.current(self._label())
        boundaries = self._boundary_tensors.get(t.device)
        if boundaries is None:
            boundaries = torch.tensor(self.timestep_boundaries, dtype=torch.float32, device=t.device)
            self._boundary_tensors[t.device] = boundaries
        groups = torch.bucketize(t.to(torch.float32), boundaries, right=True)  # float32: exact for timesteps
        if groups.numel() == 1 or groups.numel() == x.shape[0]:
            return groups
        if x.shape[0] % groups.numel():
            raise ValueError(f"{self._label()}: an input batch of {x.shape[0]} rows does not divide into the "
                             f"{groups.numel()} timesteps of the forward")
        return groups.repeat_interleave(x.shape[0] // groups.numel())

    def observe(self, x: torch.Tensor) -> None:
        """Accumulate calibration statistics of ``x`` (no effect on the quantization parameters)."""
        if self.is_off:
            return
        if self.num_groups == 1:
            self._observe_group(0, x)
            return
        groups = self.groups_of(x)
        if groups.numel() == 1:
            self._observe_group(int(groups), x)
            return
        for g in groups.unique().tolist():
            self._observe_group(g, x[groups == g])

    def _observe_group(self, group: int, x: torch.Tensor) -> None:
        rows = channel_rows(x.detach(), self.axis)
        if rows.shape[1] != self.num_channels:
            raise ValueError(f"{self._label()}: expected {self.num_channels} channels, got {rows.shape[1]}")
        if self.observers[group] is None:
            self.observers[group] = TensorObserver(self.num_channels, self._max_rows())
        self.observers[group].update(rows)

    def _max_rows(self) -> int:
        # Keep at least 1024 rows per channel so per-channel percentiles stay meaningful.
        return max(self.max_samples // self.num_channels, 1024)

    def unobserved_groups(self) -> list[int]:
        """Groups that have seen no data since the last initialisation (empty for 16-bit quantizers)."""
        if self.is_off:
            return []
        return [g for g, obs in enumerate(self.observers) if obs is None or obs.seen == 0]

    def init_from_observations(self, method: str | None = None) -> None:
        """Set scale/zero point (of every timestep group) from the accumulated observations, then drop them."""
        if self.is_off:
            return
        method = method or self.init_method
        check_init_method(method)
        missing = self.unobserved_groups()
        if missing:
            where = "" if self.num_groups == 1 else " for timestep " + ", ".join(self.group_range(g) for g in missing)
            raise RuntimeError(f"{self._label()}: no observations{where}; run calibration data through it first")
        qparams = [self._qparams_of(obs, method) for obs in self.observers]
        if self.num_groups == 1:
            scale, zero_point = qparams[0]
        else:
            scale, zero_point = torch.stack([s for s, _ in qparams]), torch.stack([z for _, z in qparams])
        self.set_qparams(scale, zero_point)
        self.initialized.fill_(True)
        self._ready = True
        self.reset_observations()

    def _qparams_of(self, obs: TensorObserver, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        if method == "minmax":
            return minmax_qparams(obs.min_val, obs.max_val, self.bits, self.symmetric)
        if method == "percentile":
            return init_percentile(obs.samples, self.bits, self.symmetric, self.percentile)
        return init_mse(obs.samples, self.bits, self.symmetric, self.grid, min_val=obs.min_val, max_val=obs.max_val)

    def calibrate(self, x: torch.Tensor, method: str | None = None) -> None:
        """Shortcut for ``observe(x)`` followed by ``init_from_observations(method)``."""
        self.observe(x)
        self.init_from_observations(method)

    def reset_observations(self) -> None:
        """Forget accumulated statistics."""
        self.observers = [None] * self.num_groups

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    @property
    def holds_qparams(self) -> bool:
        return not self.is_off and bool(self.initialized)  # an uncalibrated quantizer keeps placeholder ones

    def _label(self) -> str:
        return f"ActivationQuantizer {self.name!r}" if self.name else "ActivationQuantizer"

    def qparams_for(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` shaped to broadcast against ``x``: this forward's timestep group(s), and the
        channel axis if per-channel. ``scale`` replaces ``self.scale`` (e.g. its clamped step size)."""
        scale = self.scale if scale is None else scale
        shape = broadcast_shape(x, self.axis)
        if self.num_groups == 1:
            return scale.reshape(shape), self.zero_point.reshape(shape)
        groups = self.groups_of(x)
        shape[0] = groups.numel()
        return scale[groups].reshape(shape), self.zero_point[groups].reshape(shape)

    def forward(self, x: torch.Tensor, enabled: bool = True) -> torch.Tensor:
        """Quantize ``x`` if ``enabled``; while ``observing``, record statistics and return ``x`` unchanged."""
        if self.observing:
            self.observe(x)
            return x
        if not enabled or self.is_off:
            return x
        if not self._ready:
            raise RuntimeError(
                f"{self._label()} ({self.bits}-bit) used before initialisation: call "
                "calibrate_activations(model, batches) or observe() + init_from_observations() first"
            )
        factor = self._lsq_factor(x[0].numel() if x.dim() > 1 else x.numel(), self.num_groups)
        return fake_quantize_broadcast(x, *self.qparams_for(x, self.scale.clamp_min(MIN_SCALE)), self.quant_min,
                                       self.quant_max, factor)

    def extra_repr(self) -> str:
        groups = f", timestep_boundaries={list(self.timestep_boundaries)}" if self.num_groups > 1 else ""
        return f"{super().extra_repr()}, init={self.init_method}{groups}"
