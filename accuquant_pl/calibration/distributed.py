"""Data-parallel block reconstruction: gradient averaging that DDP's own reducer cannot do here, and the check
that the ranks stayed identical.

DDP's gradient synchronisation cannot serve block reconstruction: its reducer is built once, when the strategy
wraps the module, over the parameters that require grad at that moment, and it expects one backward per forward,
reaching every registered parameter. Here the trainable set changes every epoch (one unit each), AdaRound's V is
dropped when a unit hardens, and a training step calls backward several times (rounding regulariser, approx /
stepwise rollouts). So training steps run with the reducer off (:func:`reducer_off`) and, before every optimiser
step, the unit's gradients go through one ``strategy.reduce(mean)`` of a flat buffer (:func:`average_gradients`).
Each rank's loss is a mean over its equal-sized shard of the global batch, so the mean of the ranks' gradients is
the gradient of the global batch; the rounding regulariser's gradient is the same on every rank and averages to
itself. Every rank then takes the same Adam step from the same state, and the ranks stay identical (checked per
unit, :func:`check_ranks_agree`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from lightning.pytorch.strategies import ParallelStrategy, Strategy
from torch import Tensor, nn


def reducer_off(strategy: Strategy) -> AbstractContextManager:
    """The strategy's ``block_backward_sync`` (DDP's ``no_sync``): backward passes inside leave DDP's reducer idle.
    Lightning re-enables the reducer after every manual-optimisation forward, hence a context per training step."""
    return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()


def average_gradients(strategy: Strategy, params: list[nn.Parameter]) -> None:
    """Replace every gradient of ``params`` by its mean over the ranks (no-op on one process)."""
    if strategy.world_size <= 1:
        return
    # Every rank sends a buffer of the same size (zeros for a missing gradient), so no rank can wait on a
    # collective the others skip; a parameter without a gradient keeps None, as on one device.
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = strategy.reduce(flat, reduce_op="mean")
    offset = 0
    for p in params:
        if p.grad is not None:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def check_ranks_agree(module: nn.Module, all_gather: Callable[[Tensor], Tensor], world_size: int, device: torch.device,
                      name: str) -> None:
    """Raise if the ranks hold different parameters or buffers in ``module`` (called after each unit)."""
    if world_size <= 1:
        return
    tensors: Iterable[Tensor] = (*module.parameters(), *module.buffers())
    local = torch.stack([t.detach().double().sum() for t in tensors] or [torch.zeros((), dtype=torch.float64)]).cpu()
    gathered = all_gather(local.to(device)).cpu()
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError(f"ranks disagree on {name} after calibrating it: their gradient averaging or their data "
                           "is not consistent")
