"""The constant-weight convolution node (accuquant_pl/quant/frozen_conv.py) against autograd's convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accuquant_pl.quant import QuantConv2d, QuantSpec, quantize
from accuquant_pl.quant.frozen_conv import FrozenWeightConv2d, frozen_weight_conv2d
from tests.conftest import tiny_unet

CASES = [  # (in, out, kernel, stride, padding, dilation, groups, padding_mode)
    (8, 16, 3, 1, 1, 1, 1, "zeros"),
    (8, 16, 3, 2, 1, 1, 1, "zeros"),  # a downsampling conv: the input size is not implied by the output
    (8, 8, 3, 1, 2, 2, 2, "zeros"),
    (8, 4, 1, 1, 0, 1, 1, "zeros"),
    (8, 8, 3, 1, 1, 1, 1, "reflect"),
    (8, 8, (3, 1), (2, 1), (1, 0), 1, 1, "zeros"),  # non-square kernel and stride
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_same_forward_and_input_gradient_bit_for_bit_bias_gradient_to_rounding(case):
    cin, cout, k, stride, padding, dilation, groups, mode = case
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, padding_mode=mode)
    conv.weight.requires_grad_(False)
    x = torch.randn(4, cin, 11, 11, generator=g, requires_grad=True)
    upstream = torch.randn(conv(x).shape, generator=g)
    ref = conv(x)
    ref.backward(upstream)
    ref_x, ref_b = x.grad.clone(), conv.bias.grad.clone()
    x.grad = conv.bias.grad = None
    out = frozen_weight_conv2d(conv, x, conv.weight)
    assert type(out.grad_fn).__name__ == "FrozenWeightConv2dBackward"
    out.backward(upstream)
    assert torch.equal(out, ref) and torch.equal(x.grad, ref_x)
    torch.testing.assert_close(conv.bias.grad, ref_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained", ["bias only", "input only, no bias"])
def test_a_bias_alone_or_an_input_without_bias(trained):
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=trained == "bias only").requires_grad_(False)
    if conv.bias is not None:
        conv.bias.requires_grad_(True)
    x = torch.randn(2, 4, 7, 7, generator=g, requires_grad=trained != "bias only")
    upstream = torch.randn(2, 6, 7, 7, generator=g)
    out = frozen_weight_conv2d(conv, x, conv.weight)
    assert out is not None and torch.equal(out, conv(x))
    out.backward(upstream)
    if conv.bias is not None:
        torch.testing.assert_close(conv.bias.grad, upstream.sum((0, 2, 3)))
        assert x.grad is None
    else:
        x_ref = x.detach().clone().requires_grad_(True)
        conv(x_ref).backward(upstream)
        assert torch.equal(x.grad, x_ref.grad)


def test_it_saves_the_weight_and_no_input():
    conv = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    conv.bias.requires_grad_(True)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    out = FrozenWeightConv2d.apply(x, conv.weight, conv.bias, (1, 1), (1, 1), (1, 1), 1)
    assert [t.shape for t in out.grad_fn.saved_tensors] == [conv.weight.shape]


def test_it_stands_aside_where_the_weight_trains_or_no_graph_is_recorded():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    assert frozen_weight_conv2d(conv, x, conv.weight) is None  # the weight needs its gradient
    with torch.no_grad():
        assert frozen_weight_conv2d(conv, x, conv.weight.detach()) is None
    same = nn.Conv2d(8, 8, 3, padding="same")
    assert frozen_weight_conv2d(same, x, same.weight.detach()) is None


def test_a_quantized_unet_with_frozen_weights_uses_it_and_a_trained_one_does_not():
    unet = tiny_unet(seed=0).eval()
    quantize(unet, QuantSpec(weight_bits=4, act_bits=16))
    unet.requires_grad_(False)
    convs = [m for m in unet.modules() if isinstance(m, QuantConv2d)]
    assert convs
    conv = convs[1]
    assert type(conv(torch.randn(2, conv.in_channels, 8, 8, requires_grad=True)).grad_fn).__name__ == \
        "FrozenWeightConv2dBackward"
    conv.weight_quantizer.requires_grad_(True)  # a unit being calibrated: its quantized weight needs a gradient
    assert type(conv(torch.randn(2, conv.in_channels, 8, 8, requires_grad=True)).grad_fn).__name__ != \
        "FrozenWeightConv2dBackward"
