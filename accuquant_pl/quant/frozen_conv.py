"""A 2-D convolution whose weight is a constant: the same forward, a backward that skips the weight's work.

In the final stage (and in any backward that reaches a hardened layer's input) a quantized convolution's weight
is a constant while its input and bias need gradients. Autograd's convolution backward then still saves the
input and, on CPU (oneDNN), runs the weight-gradient kernel to produce the bias gradient: on the digits UNet it
cost as much as with the weight gradient, about twice the input gradient alone. This node computes the input
gradient alone (``torch.nn.grad.conv2d_input``, the same oneDNN kernel and bits as autograd's) and the bias
gradient as the sum of the output gradient over batch and space, and saves no input. The bias gradient is the
same sum in another order (float rounding); the forward is ``F.conv2d`` itself.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.nn.modules.utils import _pair


class FrozenWeightConv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, ...)`` with ``weight`` treated as a constant (no gradient, not saved twice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple,  # noqa: ANN001
                padding: tuple, dilation: tuple, groups: int) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.args = x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        # Under autocast the forward ran in the autocast dtype (the output gradient's); the saved weight did not.
        grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight.to(grad.dtype), grad, stride, padding, dilation,
                                            groups) if ctx.needs_input_grad[0] else None
        grad_b = grad.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None, None, None, None


def frozen_weight_conv2d(conv: torch.nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``conv``'s forward on ``x`` with ``weight`` through :class:`FrozenWeightConv2d` when that applies (a graph is
    recorded, the weight needs no gradient, numeric padding); None otherwise (the caller runs the plain conv)."""
    if not torch.is_grad_enabled() or weight.requires_grad or isinstance(conv.padding, str):
        return None
    if not (x.requires_grad or (conv.bias is not None and conv.bias.requires_grad)):
        return None
    padding = _pair(conv.padding)
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = (0, 0)
    return FrozenWeightConv2d.apply(x, weight, conv.bias, _pair(conv.stride), padding, _pair(conv.dilation),
                                    conv.groups)
