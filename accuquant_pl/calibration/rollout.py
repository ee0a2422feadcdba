"""The AccuQuant n-step rollout and its four gradient modes (docs/METHOD.md, "Gradients").

Each function rolls the quantized model out from ``x`` over the steps of a group, computes the loss of
its final state against the FP target, *calls backward itself* (the modes differ exactly in how the
backward pass is organised) and returns the detached loss. ``network(j, x)`` is the quantized model's
(guided) output at the group's j-th step; ``phi(j, x, out)`` is that step of the real sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Network = Callable[[int, Tensor], Tensor]
Phi = Callable[[int, Tensor, Tensor], Tensor]
Reduction = Literal["mean", "sum_per_sample"]
GRADIENT_MODES = ("exact", "checkpointed", "approx", "stepwise")


def state_loss(x: Tensor, target: Tensor, reduction: Reduction = "mean") -> Tensor:
    """||x - target||^2 / numel ('mean'), or summed per sample and averaged over the batch (BRECQ's scale)."""
    if reduction == "mean":
        return (x - target).pow(2).mean()
    if reduction == "sum_per_sample":
        return (x - target).pow(2).flatten(1).sum(1).mean()
    raise ValueError(f"unknown loss reduction {reduction!r}; choose 'mean' or 'sum_per_sample'")


def rollout_exact(network: Network, phi: Phi, x: Tensor, targets: Tensor, reduction: Reduction = "mean",
                  scale: float = 1.0) -> Tensor:
    """Back-propagate through all n network evaluations (activation memory O(n))."""
    for j in range(targets.shape[0]):
        x = phi(j, x, network(j, x))
    loss = state_loss(x, targets[-1], reduction)
    (loss * scale).backward()
    return loss.detach()


def rollout_checkpointed(network: Network, phi: Phi, x: Tensor, targets: Tensor, reduction: Reduction = "mean",
                         scale: float = 1.0) -> Tensor:
    """The exact gradient, each step recomputed in the backward pass: only the n states are kept (O(1) network
    activations)."""
    for j in range(targets.shape[0]):
        x = checkpoint(lambda state, j=j: phi(j, state, network(j, state)), x, use_reentrant=False)
    loss = state_loss(x, targets[-1], reduction)
    (loss * scale).backward()
    return loss.detach()


def rollout_approx(network: Network, phi: Phi, x: Tensor, targets: Tensor, reduction: Reduction = "mean",
                   scale: float = 1.0) -> Tensor:
    """AccuQuant-style approximation: no gradient through the network's input on the recurrent path.

    Pass 1 rolls out without a graph, keeping the n states and outputs; g_j = dL/d out_j is taken through
    the sampler chain alone (outputs as leaves); pass 2 recomputes each network output with a graph and
    back-propagates g_j into it, one step at a time.
    """
    n = targets.shape[0]
    states, outputs = [], []
    with torch.no_grad():
        for j in range(n):
            states.append(x)
            outputs.append(network(j, x))
            x = phi(j, x, outputs[-1])
    leaves = [out.detach().requires_grad_(True) for out in outputs]
    chain = states[0]
    with torch.enable_grad():
        for j in range(n):
            chain = phi(j, chain, leaves[j])
        loss = state_loss(chain, targets[-1], reduction)
        grads = torch.autograd.grad(loss * scale, leaves)
    for j in range(n):
        network(j, states[j]).backward(grads[j])
    return loss.detach()


def rollout_stepwise(network: Network, phi: Phi, x: Tensor, targets: Tensor, reduction: Reduction = "mean",
                     scale: float = 1.0) -> Tensor:
    """Each step matches the FP trajectory's next state from the (detached) quantized state; backward per step.

    Returns the summed step losses.
    """
    total = torch.zeros((), device=x.device)
    for j in range(targets.shape[0]):
        x_next = phi(j, x.detach(), network(j, x.detach()))
        loss = state_loss(x_next, targets[j], reduction)
        (loss * scale).backward()
        total = total + loss.detach()
        x = x_next.detach()
    return total


ROLLOUTS: dict[str, Callable[..., Tensor]] = {
    "exact": rollout_exact,
    "checkpointed": rollout_checkpointed,
    "approx": rollout_approx,
    "stepwise": rollout_stepwise,
}


def rollout(mode: str, network: Network, phi: Phi, x: Tensor, targets: Tensor, reduction: Reduction = "mean",
            scale: float = 1.0) -> Tensor:
    """Dispatch to the rollout of gradient ``mode``; ``targets`` is (n, B, ...): the FP states after each step."""
    if mode not in ROLLOUTS:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of {GRADIENT_MODES}")
    return ROLLOUTS[mode](network, phi, x, targets, reduction, scale)
