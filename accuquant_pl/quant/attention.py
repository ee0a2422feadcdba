"""Quantized act-act matmuls of diffusers ``Attention`` through an ``nn.Module`` attention processor.

The maths reproduce diffusers' ``AttnProcessor`` (explicit baddbmm / softmax / bmm path) with activation
quantizers on the query and key (operands of QK^T), the softmax probabilities and the value (operands
of probs @ V). Being an ``nn.Module`` set through ``attn.set_processor``, the processor is a registered
submodule ``<attention>.processor``, so its quantizers live in the state dict.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from .layers import make_act_quantizer
from .spec import ActQuantConfig
from .state import QuantStateMixin

SUPPORTED_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


class QuantAttnProcessor(QuantStateMixin, nn.Module):
    """Attention processor with fake-quantized QK^T and softmax-V operands.

    Follows ``act_quant_enabled``; it has no weights (the projections are quantized layers themselves).
    Softmax probabilities always use an asymmetric range: they lie in [0, 1], a symmetric grid would
    waste half its levels.
    """

    def __init__(self, config: ActQuantConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self._init_quant_state()
        if config.per_channel:
            raise ValueError(
                "per-channel activation quantization requested for attention matmul operands, which have no "
                "channel axis (heads are folded into the batch); set act_per_channel=False or "
                "quantize_attention_matmuls=False"
            )
        self.config = config
        self.query_quantizer = make_act_quantizer(config, None, None, device)
        self.key_quantizer = make_act_quantizer(config, None, None, device)
        self.probs_quantizer = make_act_quantizer(replace(config, symmetric=False), None, None, device)
        self.value_quantizer = make_act_quantizer(config, None, None, device)

    # diffusers filters cross_attention_kwargs by the signature of processor.__call__, so it must name
    # its arguments (``temb`` in particular); it forwards to nn.Module.__call__ to keep hooks working.
    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _q(self, quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return quantizer(x, self.act_quant_enabled)

    def attention_probs(self, attn: Attention, query: torch.Tensor, key: torch.Tensor,
                        attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``Attention.get_attention_scores`` with quantized q, k and softmax output."""
        dtype = query.dtype
        query, key = self._q(self.query_quantizer, query), self._q(self.key_quantizer, key)
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            scores = torch.baddbmm(query.new_empty(query.shape[0], query.shape[1], key.shape[1]), query,
                                   key.transpose(-1, -2), beta=0, alpha=attn.scale)
        else:
            scores = torch.baddbmm(attention_mask, query, key.transpose(-1, -2), beta=1, alpha=attn.scale)
        if attn.upcast_softmax:
            scores = scores.float()
        return self._q(self.probs_quantizer, scores.softmax(dim=-1).to(dtype))

    def attend(self, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``probs @ value`` with quantized value (``probs`` come quantized from :meth:`attention_probs`)."""
        return torch.bmm(probs, self._q(self.value_quantizer, value))

    def forward(self, attn: Attention, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                temb: torch.Tensor | None = None) -> torch.Tensor:
        """Same maths as diffusers' ``AttnProcessor.__call__``."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = self.attention_probs(attn, query, key, attention_mask)
        hidden_states = attn.batch_to_head_dim(self.attend(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def quant_map_entry(self) -> dict[str, Any]:
        """Description of this processor for the JSON quantization map."""
        return {"class": type(self).__name__, "config": asdict(self.config)}


def install_quant_processor(attn: Attention, config: ActQuantConfig, name: str = "") -> QuantAttnProcessor:
    """Replace ``attn``'s processor by a :class:`QuantAttnProcessor` (only over the plain processors)."""
    current = attn.processor
    if not isinstance(current, (*SUPPORTED_PROCESSORS, QuantAttnProcessor)):
        raise NotImplementedError(
            f"attention {name!r} uses {type(current).__name__}; only {[c.__name__ for c in SUPPORTED_PROCESSORS]} "
            "can be replaced by the quantized processor (set quantize_attention_matmuls=False)"
        )
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        # AttnProcessor (whose maths we reproduce) ignores qk-norm while AttnProcessor2_0 applies it.
        raise NotImplementedError(f"attention {name!r} uses qk_norm, which the quantized processor lacks")
    processor = QuantAttnProcessor(config, device=attn.to_q.weight.device)
    attn.set_processor(processor)
    return processor
