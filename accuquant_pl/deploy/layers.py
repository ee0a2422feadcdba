"""Deployed quantized ``Conv2d`` / ``Linear``: integer weights in packed storage, three ways to execute them.

State (what is saved): ``qweight`` (:mod:`.packing` storage of the integer levels), ``weight_scale`` and
``weight_zero_point`` (per output channel, or per tensor), ``bias``, and the input activation quantizer(s)
with the same state-dict keys as the fake-quantized layer. Weights that were not quantized (16 bits) are kept
as a float ``weight_float`` buffer.

Execution (``set_execution``; nothing of it is saved):

* ``dequant`` (default): unpack and dequantize the weight on every forward. Only the packed bytes stay in
  memory, and the output is bit-identical to the fake-quantized layer it was frozen from (same float values
  of weight and input, same float op).
* ``cached``: dequantize once and keep the float weight: float speed, float weight memory, still bit-identical.
* ``int``: int8 x int8 -> int32 GEMMs (``torch._int_mm``; convolutions through im2col) with exact zero-point
  corrections, then one float rescale. Equal to the fake-quantized layer up to float summation order.
  Layers it cannot run (unquantized or per-channel activations, grouped convolutions, ...) fall back to
  ``dequant``; ``fallback_reason`` says why. With timestep-grouped activation ranges a batch whose samples
  sit in different groups runs that one forward as ``dequant`` (a GEMM takes one activation scale).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from accuquant_pl.quant.affine import MIN_SCALE, check_qparams, is_off, quant_range
from accuquant_pl.quant.layers import make_act_quantizer
from accuquant_pl.quant.quantizers import ActivationQuantizer
from accuquant_pl.quant.spec import LayerQuantConfig

from .int_matmul import INT32_SAFE_K, affine_int_mm, int8_shift, to_int8, with_ones_row
from .packing import storage_dtype, storage_kind, stored_numel, unpack_weight

EXECUTION_MODES = ("dequant", "cached", "int")


@dataclass(frozen=True)
class WeightFormat:
    """How a layer's weight is stored: bit width, range, scale axis, float shape and dtype."""

    bits: int
    symmetric: bool
    axis: int | None
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def is_off(self) -> bool:
        return is_off(self.bits)

    @property
    def storage(self) -> str:
        """``uint4x2``, ``int8``, ``uint8``, or the float dtype for unquantized weights."""
        return self.dtype if self.is_off else storage_kind(self.bits, self.symmetric)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def zero_point_dtype(self) -> torch.dtype:
        # Zero points lie in the level range: int8 for symmetric ranges, uint8 for asymmetric ones.
        return torch.int8 if self.symmetric else torch.uint8

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return (self.shape[self.axis],) if self.axis is not None else ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape), "storage": self.storage}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightFormat:
        fmt = cls(int(data["bits"]), bool(data["symmetric"]), data["axis"], tuple(int(d) for d in data["shape"]),
                  str(data.get("dtype", "float32")))
        if not fmt.is_off:
            quant_range(fmt.bits, fmt.symmetric)  # validates bits
        if data.get("storage", fmt.storage) != fmt.storage:
            raise ValueError(f"storage {data['storage']!r} does not match {fmt.bits}-bit weights ({fmt.storage!r})")
        if fmt.axis is not None and not 0 <= fmt.axis < len(fmt.shape):
            raise ValueError(f"weight axis {fmt.axis} outside a {len(fmt.shape)}-d weight")
        return fmt


@dataclass
class _IntPlan:
    """Precomputed int8 weight slices per input segment (one per activation quantizer)."""

    segments: list[tuple[int, int, ActivationQuantizer, torch.Tensor, torch.Tensor]]  # c0, c1, quantizer, w8 + ones row, w_sum
    zw: torch.Tensor  # int32 [N]
    sw: torch.Tensor  # float [N]


class DeployedLayer(nn.Module):
    """Shared storage, dequantization and execution switch of :class:`DeployedConv2d` / :class:`DeployedLinear`."""

    channel_axis: int
    out_channels: int

    def _init_storage(self, fmt: WeightFormat, config: LayerQuantConfig, in_channels: int, has_bias: bool,
                      device: torch.device | str | None) -> None:
        self.fmt, self.quant_config = fmt, config
        if fmt.is_off:
            self.register_buffer("weight_float", torch.empty(fmt.shape, dtype=fmt.torch_dtype, device=device))
        else:
            numel = stored_numel(int(torch.Size(fmt.shape).numel()), fmt.bits)
            self.register_buffer("qweight", torch.empty(numel, dtype=storage_dtype(fmt.bits, fmt.symmetric),
                                                        device=device))
            self.register_buffer("weight_scale", torch.empty(fmt.scale_shape, device=device))
            self.register_buffer("weight_zero_point",
                                 torch.empty(fmt.scale_shape, dtype=fmt.zero_point_dtype, device=device))
        bias = torch.empty(fmt.shape[0], dtype=fmt.torch_dtype, device=device) if has_bias else None
        self.register_parameter("bias", nn.Parameter(bias, requires_grad=False) if bias is not None else None)
        split = config.split
        first = in_channels if split is None else split
        self.input_quantizer = make_act_quantizer(config.act, first, self.channel_axis, device)
        self.input_quantizer_skip = (
            None if split is None else make_act_quantizer(config.act, in_channels - split, self.channel_axis, device)
        )
        self.execution = "dequant"
        self.fallback_reason: str | None = None
        self._cached: torch.Tensor | None = None
        self._int: _IntPlan | None = None

    # ----- weights -----
    def levels(self, check: bool = False) -> torch.Tensor:
        """Integer weight levels ``q`` (int16, weight shape); ``check`` validates their range."""
        return unpack_weight(self.qweight, self.fmt.bits, self.fmt.symmetric, self.fmt.shape, check=check)

    def dequantize(self) -> torch.Tensor:
        """``(q - zero_point) * scale`` in the weight's float dtype: the fake-quantized weight, bit for bit."""
        if self.fmt.is_off:
            return self.weight_float
        # The scale's dtype, not fmt.dtype: it follows model.to(dtype) (fmt.dtype records the exported dtype).
        dtype = self.weight_scale.dtype
        shape = [1] * len(self.fmt.shape)
        if self.fmt.axis is not None:
            shape[self.fmt.axis] = self.fmt.shape[self.fmt.axis]
        s = self.weight_scale.to(dtype).reshape(shape)
        zp = self.weight_zero_point.to(dtype).reshape(shape)
        return (self.levels().to(dtype) - zp) * s

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that inspects ``layer.weight``; the forward does not need it)."""
        return self.dequantize()

    def validate(self) -> None:
        """Check the stored levels, zero points and scales (raises ``ValueError``); done once by the loader."""
        if self.fmt.is_off:
            return
        self.levels(check=True)
        qmin, qmax = quant_range(self.fmt.bits, self.fmt.symmetric)
        check_qparams(self.weight_scale, self.weight_zero_point, qmin, qmax, "weight")

    # ----- activations -----
    def _segments(self) -> list[tuple[int, int, ActivationQuantizer]]:
        """Input channel ranges and their activation quantizers."""
        in_channels = self.fmt.shape[1] * getattr(self, "groups", 1)
        if self.input_quantizer_skip is None:
            return [(0, in_channels, self.input_quantizer)]
        split = self.quant_config.split
        return [(0, split, self.input_quantizer), (split, in_channels, self.input_quantizer_skip)]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Input fake-quantized exactly as in the calibrated layer (split along channels if configured)."""
        if self.input_quantizer_skip is None:
            return self.input_quantizer(x)
        split = self.quant_config.split
        hidden, skip = x.split([split, x.shape[self.channel_axis] - split], dim=self.channel_axis)
        return torch.cat([self.input_quantizer(hidden), self.input_quantizer_skip(skip)], dim=self.channel_axis)

    @staticmethod
    def _int_qparams(x: torch.Tensor, q: ActivationQuantizer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``q``'s scalar step size (clamped as the forward does) and zero point for this forward's input ``x``;
        None when the batch's samples sit in different timestep groups (one GEMM takes one activation scale)."""
        if q.num_groups == 1:
            return q.scale.detach().clamp_min(MIN_SCALE), q.zero_point
        groups = q.groups_of(x)
        if groups.numel() > 1 and not bool((groups == groups[0]).all()):
            return None
        g = int(groups[0])
        return q.scale.detach()[g].clamp_min(MIN_SCALE), q.zero_point[g]

    @staticmethod
    def _act_levels(x: torch.Tensor, q: ActivationQuantizer, scale: torch.Tensor,
                    zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shifted activation levels (float, integer-valued) and the shifted zero point (int32 scalar)."""
        s = scale.to(x.dtype)
        shift = int8_shift(q.quant_max)
        # Same formula as fake_quantize, so the levels are exactly those the fake-quantized layer uses.
        levels = torch.clamp(torch.round(x * (1.0 / s)) + zero_point.to(x.dtype), q.quant_min, q.quant_max)
        return levels - shift, (zero_point.to(torch.int32) - shift).reshape(())

    def _segment_qparams(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """:meth:`_int_qparams` of every input segment; None if any segment cannot take one scale."""
        qparams = [self._int_qparams(x, q) for _, _, q, _, _ in self._int.segments]
        return None if any(p is None for p in qparams) else qparams

    # ----- execution -----
    def int_unsupported(self) -> str | None:
        """Why ``int`` execution cannot run this layer (None if it can)."""
        if self.fmt.is_off:
            return "weight is not quantized"
        if self.qweight.device.type != "cpu":
            # CUDA's _int_mm needs M > 16 and K, N multiples of 8; only the CPU kernel takes any shape.
            return f"int execution runs on CPU tensors, not {self.qweight.device.type}"
        if self.fmt.axis not in (0, None):
            return f"weight scales along axis {self.fmt.axis}"
        for _, _, q in self._segments():
            if q.is_off:
                return "input is not quantized"
            if q.axis is not None:
                return "per-channel input quantization"
        return self._int_unsupported_op()

    def _int_unsupported_op(self) -> str | None:
        return None

    def set_execution(self, mode: str) -> str:
        """Switch to ``dequant``, ``cached`` or ``int``; returns the mode actually used (``int`` may fall back)."""
        if mode not in EXECUTION_MODES:
            raise ValueError(f"unknown execution {mode!r}; choose one of {EXECUTION_MODES}")
        self._cached, self._int, self.fallback_reason = None, None, None
        if mode == "int":
            self.fallback_reason = self.int_unsupported()
            if self.fallback_reason is None:
                self._int = self._int_plan()
            else:
                mode = "dequant"
        elif mode == "cached":
            self._cached = self.dequantize().detach()
        self.execution = mode
        return mode

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight levels (weight shape) and zero points in int8: asymmetric 8-bit ones shifted by 128 together,
        so ``(q - zero_point)`` is unchanged (the int GEMMs here and the ONNX export's initializers)."""
        shift = int8_shift(quant_range(self.fmt.bits, self.fmt.symmetric)[1])
        return to_int8(self.levels(), shift), to_int8(self.weight_zero_point.to(torch.int16), shift)

    def _int_plan(self) -> _IntPlan:
        n = self.fmt.shape[0]
        w8, zw8 = self.int8_weight()
        zw = zw8.to(torch.int32).reshape(-1).expand(n).contiguous()
        sw = self.weight_scale.float().reshape(-1).expand(n).contiguous()
        segments = []
        for c0, c1, q in self._segments():
            w_seg = self._weight_rows(w8, c0, c1)
            if w_seg.shape[1] > INT32_SAFE_K:
                raise ValueError(f"reduction length {w_seg.shape[1]} is too long for exact int32 accumulation")
            segments.append((c0, c1, q, with_ones_row(w_seg), w_seg.sum(dim=1, dtype=torch.int32)))
        return _IntPlan(segments, zw, sw)

    def _weight_rows(self, w8: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """``[N, K]`` int8 weight rows of input channels ``c0:c1``, in the order the int forward lays out K."""
        return w8[:, c0:c1].contiguous()

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to(device / dtype) moves the saved tensors; rebuild the derived ones (cache, int8 plan) from them.
        out = super()._apply(fn, recurse)
        if self.execution != "dequant":
            self.set_execution(self.execution)
        return out

    def derived_bytes(self) -> int:
        """Bytes held by the execution mode on top of the saved tensors (float cache or int8 weights)."""
        if self._cached is not None:
            return self._cached.numel() * self._cached.element_size()
        if self._int is not None:
            return sum(w.numel() * w.element_size() + s.numel() * s.element_size()
                       for _, _, _, w, s in self._int.segments) + 8 * self.fmt.shape[0]
        return 0

    def _weight_for_forward(self) -> torch.Tensor:
        return self._cached if self._cached is not None else self.dequantize()

    def extra_repr(self) -> str:
        return f"bits={self.fmt.bits}, storage={self.fmt.storage}, execution={self.execution}"


class DeployedConv2d(DeployedLayer):
    """Deployed ``nn.Conv2d`` (see the module docstring)."""

    channel_axis = 1

    def __init__(self, conv: nn.Conv2d, fmt: WeightFormat, config: LayerQuantConfig,
                 device: torch.device | str | None = None) -> None:
        """Structure of ``conv`` (any device, meta included; its tensors are not used); tensors uninitialised."""
        super().__init__()
        if tuple(conv.weight.shape) != fmt.shape:
            raise ValueError(f"weight shape {fmt.shape} does not match the model's {tuple(conv.weight.shape)}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self._init_storage(fmt, config, conv.in_channels, conv.bias is not None, device)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # nn.Conv2d._conv_forward, so the float path is the very same op as in the calibrated layer.
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _int_unsupported_op(self) -> str | None:
        if self.groups != 1:
            return "grouped convolution"
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return f"padding {self.padding!r} / {self.padding_mode!r}"
        return None

    def _weight_rows(self, w8: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        # K ordered (kh, kw, channel): the im2col below gathers channels-last slices, channels innermost.
        return w8[:, c0:c1].permute(0, 2, 3, 1).reshape(w8.shape[0], -1).contiguous()

    def _im2col(self, x8: torch.Tensor, zx: int) -> torch.Tensor:
        """``[B * Ho * Wo, kh * kw * C]`` int8 patches of channels-last ``x8`` (padded with the level ``zx``)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        if ph or pw:
            # Pad with the zero point's level: it dequantizes to 0.0, like the zero padding of the float conv.
            x8 = F.pad(x8, (0, 0, pw, pw, ph, ph), value=zx)
        b, h, w, c = x8.shape
        ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if (kh, kw, sh, sw) == (1, 1, 1, 1):
            return x8.reshape(b * ho * wo, c)
        # One strided slice per kernel tap, concatenated on the channel axis: copies whole channel rows,
        # several times faster than F.unfold + transpose on CPU.
        taps = [x8[:, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw, :]
                for i in range(kh) for j in range(kw)]
        return torch.cat(taps, dim=-1).reshape(b * ho * wo, kh * kw * c)

    def _int_forward(self, x: torch.Tensor, qparams: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        plan = self._int
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        b, _, h, w = x.shape
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        out = None
        for (c0, c1, q, w8, w_sum), (sx, zp) in zip(plan.segments, qparams, strict=True):
            levels, zx = self._act_levels(x[:, c0:c1], q, sx, zp)
            cols = self._im2col(levels.to(torch.int8).permute(0, 2, 3, 1), int(zx))
            part = affine_int_mm(cols, zx, w8, plan.zw, w_sum).to(torch.float32) * sx
            out = part if out is None else out + part
        out = out * plan.sw
        if self.bias is not None:
            out = out + self.bias.float()
        return out.reshape(b, ho, wo, -1).permute(0, 3, 1, 2).contiguous().to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qparams = self._segment_qparams(x) if self._int is not None else None
        if qparams is not None:
            return self._int_forward(x, qparams)
        return self._conv(self.quantize_input(x), self._weight_for_forward())


class DeployedLinear(DeployedLayer):
    """Deployed ``nn.Linear`` (see the module docstring)."""

    channel_axis = -1

    def __init__(self, linear: nn.Linear, fmt: WeightFormat, config: LayerQuantConfig,
                 device: torch.device | str | None = None) -> None:
        """Structure of ``linear`` (any device, meta included; its tensors are not used); tensors uninitialised."""
        super().__init__()
        if tuple(linear.weight.shape) != fmt.shape:
            raise ValueError(f"weight shape {fmt.shape} does not match the model's {tuple(linear.weight.shape)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_channels = linear.out_features
        self._init_storage(fmt, config, linear.in_features, linear.bias is not None, device)

    def _int_forward(self, x: torch.Tensor, qparams: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        plan = self._int
        rows = x.reshape(-1, x.shape[-1])
        out = None
        for (c0, c1, q, w8, w_sum), (sx, zp) in zip(plan.segments, qparams, strict=True):
            levels, zx = self._act_levels(rows[:, c0:c1], q, sx, zp)
            part = affine_int_mm(levels.to(torch.int8), zx, w8, plan.zw, w_sum).to(torch.float32) * sx
            out = part if out is None else out + part
        out = out * plan.sw
        if self.bias is not None:
            out = out + self.bias.float()
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qparams = self._segment_qparams(x) if self._int is not None else None
        if qparams is not None:
            return self._int_forward(x, qparams)
        return F.linear(self.quantize_input(x), self._weight_for_forward(), self.bias)


DEPLOYED_LAYERS: dict[type[nn.Module], type[DeployedLayer]] = {nn.Conv2d: DeployedConv2d, nn.Linear: DeployedLinear}
"""Float module type -> deployed module type (exact type match, as for the fake-quantized layers)."""
