"""The export form of a deployed model: the modules whose traced forward is the ONNX QDQ graph.

Built from a loaded export (``from_deployed`` / ``from_quantizer`` / ``from_processor``), they hold the export's
integer weight levels (in int8: asymmetric 8-bit levels shifted by 128 with their zero points, as the int execution
mode does), scales and zero points, and quantize activations with the calibrated parameters through
:mod:`.onnx_ops`. Where the model has timestep groups, every activation quantizer takes its scale and zero point
of the forward's group from a table, indexed by the group that :class:`OnnxGraph` computes once from the timestep
input: one graph serves every timestep.

Convolutions have two graph forms (``conv_layout``):

* ``matmul`` (default, for ONNX Runtime on CPU): zero padding in float (it quantizes to the zero point's level,
  as the PyTorch model pads), the levels gathered into patches (im2col with a constant index), then
  ``DequantizeLinear -> MatMul``, which ONNX Runtime runs as an int8 GEMM with a float output
  (``MatMulIntegerToFloat``). Its convolution kernels only come in integer form with a requantized output
  (``QLinearConv``), which the model does not have: its convolution outputs stay float.
* ``conv``: ``DequantizeLinear -> Conv``, the form TensorRT builds int8 convolutions from.

A split skip concatenation (two activation quantizers on one input) is two GEMMs over the two channel ranges,
summed; the same holds for linears.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.nn import functional as F

from accuquant_pl.quant.affine import MIN_SCALE
from accuquant_pl.quant.attention import QuantAttnProcessor
from accuquant_pl.quant.convert import set_submodule
from accuquant_pl.quant.quantizers import ActivationQuantizer

from .layers import DeployedConv2d, DeployedLayer, DeployedLinear
from .onnx_ops import Dequantize, Quantize, ZeroPointPixel, container_dtype

CONV_LAYOUTS = ("matmul", "conv")


class TimestepGroup:
    """The timestep group of the forward being traced, shared by the activation quantizers of one graph: set by
    :class:`OnnxGraph` from its timestep input (a traced tensor), read by each :class:`OnnxActQuant`. With ``fixed``
    the graph holds that group's ranges as constants (what TensorRT needs: it takes no per-forward scales)."""

    def __init__(self, boundaries: list[float], fixed: int | None = None) -> None:
        self.boundaries = [float(b) for b in boundaries]
        if fixed is not None and not 0 <= fixed <= len(self.boundaries):
            raise ValueError(f"timestep_group={fixed} is not one of the model's {len(self.boundaries) + 1} timestep "
                             f"groups (0..{len(self.boundaries)})")
        self.fixed = fixed
        self.index: torch.Tensor | None = None
        self.quantized: list[str] = []
        """Names of the quantizers in the order the forward quantized (the graph's QuantizeLinear order)."""

    def current(self) -> torch.Tensor | int:
        if self.fixed is not None:
            return self.fixed
        if self.index is None:
            raise RuntimeError("an export-form quantizer with timestep groups ran outside OnnxGraph's forward")
        return self.index


class OnnxActQuant(nn.Module):
    """An activation quantizer with its calibrated parameters per timestep group: ``QuantizeLinear`` +
    ``DequantizeLinear`` in the graph."""

    def __init__(self, name: str, scales: torch.Tensor, zero_points: torch.Tensor, quant_min: int, quant_max: int,
                 axis: int | None, group: TimestepGroup) -> None:
        super().__init__()
        self.name, self.quant_min, self.quant_max, self.axis, self.group = name, quant_min, quant_max, axis, group
        self.register_buffer("scales", scales.float())
        self.register_buffer("zero_points", zero_points.to(container_dtype(quant_min)))

    @classmethod
    def from_quantizer(cls, q: ActivationQuantizer, group: TimestepGroup) -> OnnxActQuant | None:
        """The export form of ``q`` (None for a 16-bit quantizer: the tensor stays float)."""
        if q.is_off:
            return None
        groups = q.num_groups
        if groups > 1 and list(q.timestep_boundaries) != group.boundaries:
            raise ValueError(f"activation quantizer {q.name!r} has timestep boundaries {list(q.timestep_boundaries)}, "
                             f"not the model's {group.boundaries}")
        # The step size the forward uses (clamped as ActivationQuantizer.forward clamps it), one row per group.
        scales = q.scale.detach().clamp_min(MIN_SCALE).reshape(groups, -1)
        zero_points = q.zero_point.detach().reshape(groups, -1)
        if q.axis is None:
            scales, zero_points = scales[:, 0], zero_points[:, 0]
        return cls(q.name, scales, zero_points, q.quant_min, q.quant_max, q.axis, group)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the forward's timestep group."""
        if self.scales.shape[0] == 1:
            return self.scales[0], self.zero_points[0]
        g = self.group.current()
        return self.scales[g], self.zero_points[g]

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """The 8-bit levels of ``x`` (``QuantizeLinear``)."""
        scale, zero_point = self.qparams()
        self.group.quantized.append(self.name)
        return Quantize.apply(x, scale, zero_point, self.quant_min, self.quant_max, self.axis)

    def dequantize(self, levels: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.qparams()
        return Dequantize.apply(levels, scale, zero_point, self.axis)

    def forward(self, x: torch.Tensor, enabled: bool = True) -> torch.Tensor:
        return self.dequantize(self.levels(x)) if enabled else x


def _qdq(quantizer: OnnxActQuant | None, x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


def _int_weight(layer: DeployedLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(levels, scale, zero_point)`` of a deployed layer's weight in int8 (levels in the weight's shape)."""
    levels, zero_point = layer.int8_weight()
    return levels, layer.weight_scale.detach().float(), zero_point


class _OnnxLayer(nn.Module):
    """Shared parts of the export-form conv and linear: input segments with their quantizers, weight checks."""

    def _init_inputs(self, layer: DeployedLayer, group: TimestepGroup) -> None:
        self.bits, self.symmetric = layer.fmt.bits, layer.fmt.symmetric
        self.segments = [(c0, c1) for c0, c1, _ in layer._segments()]
        self.quantizers = nn.ModuleList([_Optional(OnnxActQuant.from_quantizer(q, group))
                                         for _, _, q in layer._segments()])
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())

    @staticmethod
    def _check(name: str, layer: DeployedLayer) -> None:
        if layer.fmt.is_off:
            raise NotImplementedError(f"layer {name!r} keeps a float weight; the ONNX export holds integer weights "
                                      "only (re-calibrate with the layer quantized)")
        if layer.fmt.axis not in (0, None):
            raise NotImplementedError(f"layer {name!r} scales its weight along axis {layer.fmt.axis}; the ONNX "
                                      "export takes per-output-channel or per-tensor weight scales")

    def _weight_axis(self, matrix: bool) -> int | None:
        # Per output channel: axis 0 of the [N, ...] weight, axis 1 of the [K, N] matrices.
        return None if self.weight_scale.dim() == 0 else (1 if matrix else 0)

    def _quantized_matmuls(self) -> bool:
        """Whether every input segment has a per-tensor quantizer, so each product is an int8 GEMM."""
        return all(q.module is not None and q.module.axis is None for q in self.quantizers)


class _Optional(nn.Module):
    """Holds a quantizer or nothing (a 16-bit input), so that the segments stay an indexable ``ModuleList``."""

    def __init__(self, module: OnnxActQuant | None) -> None:
        super().__init__()
        self.module = module


class OnnxConv2d(_OnnxLayer):
    """Export form of :class:`~accuquant_pl.deploy.layers.DeployedConv2d`."""

    def __init__(self, name: str, layer: DeployedConv2d, group: TimestepGroup, layout: str) -> None:
        super().__init__()
        self._check(name, layer)
        if layer.groups != 1:
            raise NotImplementedError(f"layer {name!r} is a grouped convolution, which the ONNX export cannot express")
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise NotImplementedError(f"layer {name!r} pads {layer.padding!r} / {layer.padding_mode!r}; the ONNX "
                                      "export takes numeric zero padding")
        if layout not in CONV_LAYOUTS:
            raise ValueError(f"conv_layout {layout!r} is not one of {CONV_LAYOUTS}")
        self._init_inputs(layer, group)
        self.kernel_size, self.stride = tuple(layer.kernel_size), tuple(layer.stride)
        self.padding, self.dilation = tuple(layer.padding), tuple(layer.dilation)
        levels, scale, zero_point = _int_weight(layer)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        # Unquantized or per-channel inputs have no int8 GEMM: they keep the standard QDQ convolution.
        self.layout = layout if self._quantized_matmuls() else "conv"
        if self.layout == "conv":
            self.register_buffer("weight_levels", levels)
        else:
            # One [K, N] matrix per input segment, K ordered (kh, kw, channel) as the patches are gathered.
            for i, (c0, c1) in enumerate(self.segments):
                self.register_buffer(f"weight_levels_{i}", levels[:, c0:c1].permute(2, 3, 1, 0)
                                     .reshape(-1, levels.shape[0]).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x) if self.layout == "conv" else self._matmul(x)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        parts = [_qdq(q.module, x[:, c0:c1]) for (c0, c1), q in zip(self.segments, self.quantizers, strict=True)]
        xq = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        weight = Dequantize.apply(self.weight_levels, self.weight_scale, self.weight_zero_point, self._weight_axis(False))
        return F.conv2d(xq, weight, self.bias, self.stride, self.padding, self.dilation)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[2]), int(x.shape[3])
        index, ho, wo = im2col_index(h, w, self.kernel_size, self.stride, self.padding, self.dilation)
        (ph, pw), out = self.padding, None
        for i, ((c0, c1), q) in enumerate(zip(self.segments, self.quantizers, strict=True)):
            c = c1 - c0
            patches = q.module.levels(x[:, c0:c1]).permute(0, 2, 3, 1).reshape(-1, h * w, c)
            if index is not None:
                if ph or pw:
                    # One pixel of zero-point levels after the map: the padded taps gather it (cheaper than a Pad).
                    patches = torch.cat([patches, ZeroPointPixel.apply(patches, q.module.qparams()[1])], dim=1)
                patches = patches.index_select(1, index).reshape(-1, ho * wo, index.numel() // (ho * wo) * c)
            weight = Dequantize.apply(getattr(self, f"weight_levels_{i}"), self.weight_scale, self.weight_zero_point,
                                      self._weight_axis(True))
            part = torch.matmul(q.module.dequantize(patches), weight)
            out = part if out is None else out + part
        out = out.reshape(-1, ho, wo, out.shape[-1]).permute(0, 3, 1, 2)
        return out if self.bias is None else out + self.bias.reshape(1, -1, 1, 1)


@lru_cache(maxsize=64)
def im2col_index(h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[torch.Tensor | None, int, int]:
    """Flat positions in the ``h x w`` map of each output position's kernel taps, ``[Ho * Wo * kh * kw]``
    ordered (output row, output column, tap row, tap column), ``h * w`` for a tap in the zero padding; None for a
    1x1 stride-1 convolution (the map itself). Also returns ``Ho, Wo``."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return None, ho, wo
    # Tap positions in the unpadded map; a tap in the padding reads position h * w (the zero-point pixel).
    rows = ((torch.arange(ho) * sh).reshape(ho, 1, 1, 1) + (torch.arange(kh) * dh).reshape(1, 1, kh, 1) - ph)
    cols = ((torch.arange(wo) * sw).reshape(1, wo, 1, 1) + (torch.arange(kw) * dw).reshape(1, 1, 1, kw) - pw)
    rows, cols = rows.expand(ho, wo, kh, kw), cols.expand(ho, wo, kh, kw)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return torch.where(inside, rows * w + cols, h * w).reshape(-1), ho, wo


class OnnxLinear(_OnnxLayer):
    """Export form of :class:`~accuquant_pl.deploy.layers.DeployedLinear`: rows of the input times the ``[K, N]``
    weight matrix, the bias added after the product is reshaped back (a bias added to the product directly
    would be fused into a float ``Gemm`` by ONNX Runtime, ahead of its integer ``MatMul`` fusion)."""

    def __init__(self, name: str, layer: DeployedLinear, group: TimestepGroup) -> None:
        super().__init__()
        self._check(name, layer)
        self._init_inputs(layer, group)
        levels, scale, zero_point = _int_weight(layer)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        for i, (c0, c1) in enumerate(self.segments):
            self.register_buffer(f"weight_levels_{i}", levels[:, c0:c1].t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, out = x.reshape(-1, x.shape[-1]), None
        for i, ((c0, c1), q) in enumerate(zip(self.segments, self.quantizers, strict=True)):
            weight = Dequantize.apply(getattr(self, f"weight_levels_{i}"), self.weight_scale, self.weight_zero_point,
                                      self._weight_axis(True))
            part = torch.matmul(_qdq(q.module, rows if len(self.segments) == 1 else rows[:, c0:c1]), weight)
            out = part if out is None else out + part
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


class OnnxAttnProcessor(QuantAttnProcessor):
    """Export form of :class:`~accuquant_pl.quant.attention.QuantAttnProcessor`: the same attention, with each
    quantized operand quantized right before its ``MatMul`` (the key transposed first), so that both products are
    ``DequantizeLinear -> MatMul`` pairs: integer GEMMs in ONNX Runtime."""

    @classmethod
    def from_processor(cls, processor: QuantAttnProcessor, group: TimestepGroup) -> OnnxAttnProcessor:
        export = cls(processor.config, device="meta")
        for key in ("query_quantizer", "key_quantizer", "probs_quantizer", "value_quantizer"):
            setattr(export, key, _Optional(OnnxActQuant.from_quantizer(getattr(processor, key), group)))
        return export

    def attention_probs(self, attn: Attention, query: torch.Tensor, key: torch.Tensor,
                        attention_mask: torch.Tensor | None) -> torch.Tensor:
        dtype = query.dtype
        query = _qdq(self.query_quantizer.module, query)
        key_t = _qdq(self.key_quantizer.module, key.transpose(-1, -2))
        if attn.upcast_attention:
            query, key_t = query.float(), key_t.float()
        scores = torch.bmm(query, key_t) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if attn.upcast_softmax:
            scores = scores.float()
        return _qdq(self.probs_quantizer.module, scores.softmax(dim=-1).to(dtype))

    def attend(self, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return torch.bmm(probs, _qdq(self.value_quantizer.module, value))


def to_export_form(model: nn.Module, boundaries: list[float], conv_layout: str = "matmul",
                   timestep_group: int | None = None) -> TimestepGroup:
    """Swap, in place, every deployed layer and quantizing attention processor of a loaded export for its export
    form; returns the :class:`TimestepGroup` its quantizers read (``timestep_group``: that group's ranges only, as
    constants). ``NotImplementedError`` names a layer the ONNX graph cannot express."""
    group = TimestepGroup(boundaries, timestep_group)
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention) and isinstance(module.processor, QuantAttnProcessor):
            module.set_processor(OnnxAttnProcessor.from_processor(module.processor, group))
        elif isinstance(module, DeployedConv2d):
            set_submodule(model, name, OnnxConv2d(name, module, group, conv_layout))
        elif isinstance(module, DeployedLinear):
            set_submodule(model, name, OnnxLinear(name, module, group))
    left = [n for n, m in model.named_modules() if isinstance(m, (ActivationQuantizer, DeployedLayer))]
    if left:
        raise NotImplementedError(f"the ONNX export cannot express {left[:5]} (not a layer or processor it knows)")
    return group


class OnnxGraph(nn.Module):
    """What the ONNX file computes: the export-form denoiser called with positional graph inputs (``sample``,
    ``timestep`` [B] float, then the conditioning inputs ``input_names`` lists), returning the prediction."""

    def __init__(self, model: nn.Module, group: TimestepGroup, input_names: list[str], sample_key: str,
                 fixed: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model, self.group, self.input_names, self.sample_key = model, group, input_names, sample_key
        self.fixed = dict(fixed or {})
        self.register_buffer("boundaries", torch.tensor(group.boundaries, dtype=torch.float32))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        t = timestep.reshape(-1)
        self.group.quantized.clear()
        # One group per forward (the pipelines give one timestep per step): the first sample's, as #{b <= t}.
        dynamic = self.group.boundaries and self.group.fixed is None
        self.group.index = (t[:1] >= self.boundaries).sum() if dynamic else None
        try:
            kwargs = dict(zip(self.input_names[2:], conditioning, strict=True))
            return self.model(**{self.sample_key: sample}, timestep=t, **kwargs, **self.fixed, return_dict=False)[0]
        finally:
            self.group.index = None
