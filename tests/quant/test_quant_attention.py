"""The quantizing attention processor reproduces diffusers' AttnProcessor and quantizes the right tensors."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from accuquant_pl.quant import ActQuantConfig, QuantAttnProcessor, quant_state
from accuquant_pl.quant.affine import fake_quantize
from accuquant_pl.quant.attention import install_quant_processor

CASES = {
    # UNet2DModel-style self attention on a 4-D feature map
    "self_groupnorm_residual": dict(kwargs=dict(query_dim=8, heads=2, dim_head=4, norm_num_groups=4,
                                                residual_connection=True, rescale_output_factor=2.0, bias=True),
                                    x=(2, 8, 3, 3), ctx=None, mask=False, temb=None),
    "cross_layernorm_mask": dict(kwargs=dict(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4,
                                             cross_attention_norm="layer_norm"),
                                 x=(2, 5, 8), ctx=(2, 7, 6), mask=True, temb=None),
    "upcast": dict(kwargs=dict(query_dim=8, heads=4, dim_head=2, upcast_attention=True, upcast_softmax=True),
                   x=(3, 4, 8), ctx=None, mask=False, temb=None),
    "spatial_norm": dict(kwargs=dict(query_dim=32, heads=2, dim_head=4, spatial_norm_dim=5, residual_connection=True),
                         x=(2, 32, 4, 4), ctx=None, mask=False, temb=(2, 5, 2, 2)),
}


def _call_args(case: dict) -> dict:
    g = torch.Generator().manual_seed(3)
    args = {"hidden_states": torch.randn(case["x"], generator=g)}
    if case["ctx"]:
        args["encoder_hidden_states"] = torch.randn(case["ctx"], generator=g)
    if case["mask"]:
        mask = torch.zeros(case["x"][0], 1, case["ctx"][1])
        mask[0, :, -2:] = -10000.0  # padding tokens of the first sample
        args["attention_mask"] = mask
    if case["temb"]:
        args["temb"] = torch.randn(case["temb"], generator=g)
    return args


@pytest.mark.parametrize("name", list(CASES))
def test_quantizers_off_equals_default_processor(name):
    case = CASES[name]
    attn = Attention(**case["kwargs"]).eval()
    args = _call_args(case)
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        ref = attn(**args)
        attn.set_processor(AttnProcessor2_0())
        ref_sdpa = attn(**args)
        install_quant_processor(attn, ActQuantConfig(8))
        with quant_state(attn, act=False):
            out = attn(**args)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ref_sdpa, rtol=1e-5, atol=1e-5)


def test_processor_is_a_registered_submodule():
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    proc = install_quant_processor(attn, ActQuantConfig(8))
    assert attn.processor is proc and isinstance(proc, QuantAttnProcessor)
    keys = set(attn.state_dict())
    for q in ("query", "key", "probs", "value"):
        assert f"processor.{q}_quantizer.scale" in keys and f"processor.{q}_quantizer.zero_point" in keys


def test_quantizers_see_and_quantize_the_matmul_operands():
    case = CASES["cross_layernorm_mask"]
    attn = Attention(**case["kwargs"]).eval()
    proc = install_quant_processor(attn, ActQuantConfig(4, init="minmax"))
    args = _call_args(case)
    seen = {}
    for q in ("query", "key", "probs", "value"):
        getattr(proc, f"{q}_quantizer").register_forward_hook(
            lambda m, i, o, q=q: seen.__setitem__(q, (m, i[0].detach(), o.detach())))
    with torch.no_grad():
        for qz in (proc.query_quantizer, proc.key_quantizer, proc.probs_quantizer, proc.value_quantizer):
            qz.observing = True
        attn(**args)
        for qz in (proc.query_quantizer, proc.key_quantizer, proc.probs_quantizer, proc.value_quantizer):
            qz.observing = False
            qz.init_from_observations()
        out = attn(**args)
    ctx = attn.norm_encoder_hidden_states(args["encoder_hidden_states"])
    torch.testing.assert_close(seen["key"][1], attn.head_to_batch_dim(attn.to_k(ctx)))
    torch.testing.assert_close(seen["query"][1], attn.head_to_batch_dim(attn.to_q(args["hidden_states"])))
    assert seen["probs"][1].shape == (4, 5, 7)  # (batch * heads, queries, keys)
    torch.testing.assert_close(seen["probs"][1].sum(-1), torch.ones(4, 5))
    assert seen["probs"][0].zero_point.item() == 0  # probabilities are >= 0: asymmetric from 0
    for m, inp, outp in seen.values():
        assert torch.equal(outp, fake_quantize(inp, m.scale, m.zero_point, m.quant_min, m.quant_max))
        assert not torch.equal(outp, inp)
    with torch.no_grad(), quant_state(attn, act=False):
        assert not torch.allclose(out, attn(**args))


def test_per_channel_attention_quantizers_rejected():
    with pytest.raises(ValueError, match="no channel axis"):
        QuantAttnProcessor(ActQuantConfig(8, per_channel=True))


def test_qk_norm_attention_rejected():
    attn = Attention(query_dim=8, heads=2, dim_head=4, qk_norm="layer_norm")
    with pytest.raises(NotImplementedError, match="qk_norm"):
        install_quant_processor(attn, ActQuantConfig(8), "blk.attn")
