"""Gradient bookkeeping shared by the calibration tests: the trainable parameters, their flat gradient, reset."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def theta(model: nn.Module) -> list[nn.Parameter]:
    """The parameters being calibrated (those that require grad)."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(params: list[nn.Parameter]) -> Tensor:
    """All gradients as one vector (zeros for a parameter without one)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def zero(params: list[nn.Parameter]) -> None:
    for p in params:
        p.grad = None
