"""Capture one block's output during a model forward: stopping the forward right after it (``block_output``)
or letting it finish on a detached copy (``run_capturing``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor, nn

T = TypeVar("T")


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


def _detached(output: Any) -> Any:
    """``output`` with its tensors detached, in the same structure (tensor or tuple/list of tensors); other
    output types come back unchanged (correct, only without the memory saving)."""
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, tuple | list) and all(isinstance(o, Tensor) for o in output):
        return type(output)(o.detach() for o in output)
    return output


def run_capturing(block: nn.Module, forward: Callable[[], T]) -> tuple[T, Tensor]:
    """Run ``forward()`` (a whole-model forward pass) and return its result together with ``block``'s output.

    The captured output keeps its graph; the rest of the forward continues from a detached copy, so a
    backward from the block output never reaches the layers after the block and they store no activations
    for one (the block-output loss is the only loss of that forward).
    """
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        captured.append(_as_tensor(output))
        return _detached(output)

    handle = block.register_forward_hook(hook)
    try:
        result = forward()
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"block {type(block).__name__} ran {len(captured)} times in one forward pass; expected once")
    return result, captured[0]
