"""The AccuQuant n-step rollout and its four gradient modes (docs/METHOD.md, "Gradients").

Each function rolls the quantized model out from ``x`` over the steps of a group, computes the loss of
its final state against the FP target, *calls backward itself* (the modes differ exactly in how the
backward pass is organised) and returns the detached loss. ``network(j, x)`` is the quantized model's
(guided) output at the group's j-th step; ``phi(j, x, out)`` is that step of the real sampler.

A multistep sampler's step also reads the group's earlier steps. Such a ``phi`` carries the attribute
``reads_history = True`` and is called ``phi(j, x, out, past_states, past_outputs)`` with the group's own
inputs and outputs of steps 0..j-1 (tuples of tensors, with their graph where the mode differentiates
through them); :class:`~accuquant_pl.diffusion.schedulers.SamplerSteps` is one. Every mode keeps the
sampler's dependence on those tensors exactly as on ``x`` and ``out``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Network = Callable[[int, Tensor], Tensor]
Phi = Callable[[int, Tensor, Tensor], Tensor]
HistoryPhi = Callable[[int, Tensor, Tensor, Sequence[Tensor], Sequence[Tensor]], Tensor]
Reduction = Literal["mean", "sum_per_sample"]
GRADIENT_MODES = ("exact", "checkpointed", "approx", "stepwise")


def _with_history(phi: Phi | HistoryPhi) -> HistoryPhi:
    """``phi`` as a history-taking step (a plain one-step ``phi`` ignores the history)."""
    if getattr(phi, "reads_history", False):
        return phi
    return lambda j, x, out, past_states, past_outputs: phi(j, x, out)


def state_loss(x: Tensor, target: Tensor, reduction: Reduction = "mean") -> Tensor:
    """||x - target||^2 / numel ('mean'), or summed per sample and averaged over the batch (BRECQ's scale)."""
    if reduction == "mean":
        return (x - target).pow(2).mean()
    if reduction == "sum_per_sample":
        return (x - target).pow(2).flatten(1).sum(1).mean()
    raise ValueError(f"unknown loss reduction {reduction!r}; choose 'mean' or 'sum_per_sample'")


def simulate(network: Network, phi: Phi | HistoryPhi, x: Tensor, n: int) -> tuple[list[Tensor], list[Tensor]]:
    """Roll out n steps without a graph: the states x_0..x_n (x_0 = ``x``) and the outputs out_0..out_{n-1}."""
    step = _with_history(phi)
    states, outputs = [x], []
    with torch.no_grad():
        for j in range(n):
            outputs.append(network(j, states[j]))
            states.append(step(j, states[j], outputs[j], tuple(states[:j]), tuple(outputs[:j])))
    return states, outputs


def rollout_exact(network: Network, phi: Phi | HistoryPhi, x: Tensor, targets: Tensor, reduction: Reduction = "mean",
                  scale: float = 1.0) -> Tensor:
    """Back-propagate through all n network evaluations (activation memory O(n))."""
    step = _with_history(phi)
    states, outputs = [], []
    for j in range(targets.shape[0]):
        out = network(j, x)
        x_next = step(j, x, out, tuple(states), tuple(outputs))
        states.append(x)
        outputs.append(out)
        x = x_next
    loss = state_loss(x, targets[-1], reduction)
    (loss * scale).backward()
    return loss.detach()


def rollout_checkpointed(network: Network, phi: Phi | HistoryPhi, x: Tensor, targets: Tensor,
                         reduction: Reduction = "mean", scale: float = 1.0) -> Tensor:
    """The exact gradient, each step recomputed in the backward pass: only the n states (and, for a multistep
    sampler, the n outputs) are kept (O(1) network activations)."""
    history = getattr(phi, "reads_history", False)
    step = _with_history(phi)
    states: list[Tensor] = []
    outputs: list[Tensor] = []
    for j in range(targets.shape[0]):
        past_states, past_outputs = tuple(states), tuple(outputs)
        if history:
            def fn(state: Tensor, j: int = j, ps: tuple = past_states, po: tuple = past_outputs):
                out = network(j, state)
                return step(j, state, out, ps, po), out

            x_next, out = checkpoint(fn, x, use_reentrant=False)
            states.append(x)
            outputs.append(out)
        else:
            x_next = checkpoint(lambda state, j=j: phi(j, state, network(j, state)), x, use_reentrant=False)
        x = x_next
    loss = state_loss(x, targets[-1], reduction)
    (loss * scale).backward()
    return loss.detach()


def rollout_approx(network: Network, phi: Phi | HistoryPhi, x: Tensor, targets: Tensor,
                   reduction: Reduction = "mean", scale: float = 1.0) -> Tensor:
    """AccuQuant-style approximation: no gradient through the network's input on the recurrent path.

    Pass 1 rolls out without a graph, keeping the n states and outputs; g_j = dL/d out_j is taken through
    the sampler chain alone (outputs as leaves; a multistep sampler's reading of earlier outputs and states
    is part of that chain); pass 2 recomputes each network output with a graph and back-propagates g_j into
    it, one step at a time.
    """
    n = targets.shape[0]
    step = _with_history(phi)
    states, outputs = simulate(network, phi, x, n)
    leaves = [out.detach().requires_grad_(True) for out in outputs]
    chain = [states[0]]
    with torch.enable_grad():
        for j in range(n):
            chain.append(step(j, chain[j], leaves[j], tuple(chain[:j]), tuple(leaves[:j])))
        loss = state_loss(chain[-1], targets[-1], reduction)
        grads = torch.autograd.grad(loss * scale, leaves)
    for j in range(n):
        network(j, states[j]).backward(grads[j])
    return loss.detach()


def rollout_stepwise(network: Network, phi: Phi | HistoryPhi, x: Tensor, targets: Tensor,
                     reduction: Reduction = "mean", scale: float = 1.0) -> Tensor:
    """Each step matches the FP trajectory's next state from the (detached) quantized state; backward per step.

    A multistep sampler reads the group's earlier (detached) states and outputs. Returns the summed step losses.
    """
    step = _with_history(phi)
    total = torch.zeros((), device=x.device)
    states: list[Tensor] = []
    outputs: list[Tensor] = []
    for j in range(targets.shape[0]):
        x = x.detach()
        out = network(j, x)
        x_next = step(j, x, out, tuple(states), tuple(outputs))
        loss = state_loss(x_next, targets[j], reduction)
        (loss * scale).backward()
        total = total + loss.detach()
        states.append(x)
        outputs.append(out.detach())
        x = x_next.detach()
    return total


ROLLOUTS: dict[str, Callable[..., Tensor]] = {
    "exact": rollout_exact,
    "checkpointed": rollout_checkpointed,
    "approx": rollout_approx,
    "stepwise": rollout_stepwise,
}


def rollout(mode: str, network: Network, phi: Phi | HistoryPhi, x: Tensor, targets: Tensor,
            reduction: Reduction = "mean", scale: float = 1.0) -> Tensor:
    """Dispatch to the rollout of gradient ``mode``; ``targets`` is (n, B, ...): the FP states after each step."""
    if mode not in ROLLOUTS:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of {GRADIENT_MODES}")
    if targets.dim() < 1 or targets.shape[0] < 1:
        raise ValueError(f"group size n must be >= 1, got {targets.shape[0] if targets.dim() else 0} targets")
    if targets.shape[1:] != x.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must be (n, *x.shape) with x {tuple(x.shape)}")
    return ROLLOUTS[mode](network, phi, x, targets, reduction, scale)
