"""Capture one block's output during a model forward, stopping the forward right after it."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the network is not needed."""


def _as_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot read a tensor from a block output of type {type(output).__name__}")


def block_output(model: nn.Module, block: nn.Module, **forward_kwargs: Any) -> Tensor:
    """Run ``model(**forward_kwargs)`` until ``block`` has produced its output, and return that output.

    Gradients flow as usual (run under ``torch.no_grad`` for targets).
    """
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(_as_tensor(output))
        raise _StopForward

    handle = block.register_forward_hook(hook)
    try:
        model(**forward_kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {type(block).__name__} did not run during the forward pass")
    return captured[0]
