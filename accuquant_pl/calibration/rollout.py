"""The AccuQuant rollout: the quantized model rolled out over one group's n sampler steps from the FP state.

Everything the rollout needs lives here: the group of a batch (:func:`group_steps`: its start, its n, the real
sampler's steps primed from the FP history, :class:`GroupSteps`), the FP states it starts from and is compared
with (:func:`fp_states`), and the two ways it is matched (docs/METHOD.md): on the sampler *state* after the n
steps (:func:`rollout`, with the four gradient modes, "Gradients") and on the calibrated *block's output* at every
rollout state (:func:`block_rollout`). ``calibration/objectives.py`` turns them into losses.

Each state-target function rolls the quantized model out from ``x`` over the steps of a group, computes the loss
of its final state against the FP target, *calls backward itself* (the modes differ exactly in how the backward
pass is organised) and returns the detached loss. ``network(j, x)`` is the quantized model's (guided) output at
the group's j-th step; ``phi(j, x, out)`` is that step of the real sampler.

A multistep sampler's step also reads the group's earlier steps. Such a ``phi`` carries the attribute
``reads_history = True`` and is called ``phi(j, x, out, past_states, past_outputs)`` with the group's own
inputs and outputs of steps 0..j-1 (tuples of tensors, with their graph where the mode differentiates
through them); :class:`GroupSteps` is one. Every mode keeps the sampler's dependence on those tensors exactly as
on ``x`` and ``out``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from diffusers import SchedulerMixin
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from accuquant_pl.calibration.capture import block_output, run_capturing
from accuquant_pl.diffusion.conditioning import Conditioning
from accuquant_pl.diffusion.sampling import model_output, network_inputs
from accuquant_pl.diffusion.schedulers import (
    history_steps,
    positioned_at,
    prime,
    scheduled_steps,
    step_arguments,
    take_step,
)

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
                   reduction: Reduction = "mean", scale: float = 1.0, recompute: bool = True) -> Tensor:
    """AccuQuant-style approximation: no gradient through the network's input on the recurrent path.

    Pass 1 rolls out, keeping the n states and outputs; g_j = dL/d out_j is taken through the sampler chain
    alone (outputs as leaves; a multistep sampler's reading of earlier outputs and states is part of that
    chain); then g_j is back-propagated into each network evaluation, one step at a time.

    ``recompute`` (O(1) activation memory in n): pass 1 runs without a graph and each network output is
    recomputed with one for its backward. ``recompute=False`` keeps pass 1's n step graphs instead: the same
    values and the same gradient bit for bit (each step evaluated on the input the recomputation would use: ``x``,
    then states computed without a graph), one network forward per step fewer, n steps' activations in memory
    at once.
    """
    n = targets.shape[0]
    step = _with_history(phi)
    if recompute:
        states, outputs = simulate(network, phi, x, n)
        graphs = None
    else:
        states, graphs = [x], []
        for j in range(n):
            graphs.append(network(j, states[j]))
            with torch.no_grad():
                states.append(step(j, states[j], graphs[j].detach(), tuple(states[:j]),
                                   tuple(g.detach() for g in graphs[:j])))
        outputs = [g.detach() for g in graphs]
    leaves = [out.detach().requires_grad_(True) for out in outputs]
    chain = [states[0]]
    with torch.enable_grad():
        for j in range(n):
            chain.append(step(j, chain[j], leaves[j], tuple(chain[:j]), tuple(leaves[:j])))
        loss = state_loss(chain[-1], targets[-1], reduction)
        grads = torch.autograd.grad(loss * scale, leaves)
    for j in range(n):
        out = network(j, states[j]) if graphs is None else graphs[j]
        out.backward(grads[j])
        if graphs is not None:
            graphs[j] = None  # free this step's graph before the next backward
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
            reduction: Reduction = "mean", scale: float = 1.0, recompute: bool = True) -> Tensor:
    """Dispatch to the rollout of gradient ``mode``; ``targets`` is (n, B, ...): the FP states after each step.
    ``recompute=False`` is for 'approx' only (see :func:`rollout_approx`)."""
    if mode not in ROLLOUTS:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of {GRADIENT_MODES}")
    if targets.dim() < 1 or targets.shape[0] < 1:
        raise ValueError(f"group size n must be >= 1, got {targets.shape[0] if targets.dim() else 0} targets")
    if targets.shape[1:] != x.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must be (n, *x.shape) with x {tuple(x.shape)}")
    if not recompute:
        if mode != "approx":
            raise ValueError(f"recompute=False keeps the step graphs of gradient mode 'approx'; mode {mode!r} "
                             "organises its backward pass itself")
        return rollout_approx(network, phi, x, targets, reduction, scale, recompute=False)
    return ROLLOUTS[mode](network, phi, x, targets, reduction, scale)


# ----- the group a batch rolls out: its steps, start, n and FP states -----
def group_size(batch: dict[str, Any]) -> int:
    """n, the steps a batch's group rolls out: the length of its items' ``timesteps``. The data module sets it per
    epoch (``data.group_size`` for the units, ``final_stage.group_size`` for the final stage, ``EpochPlan``);
    every objective reads it here."""
    return int(batch["timesteps"].shape[1])


class GroupSteps:
    """The real sampler's steps ``start .. start + n - 1`` of one group, primed from the FP trajectory cache.

    ``scale(j, x)`` is the model input at the group's step j (``scale_model_input``); calling the object,
    ``steps(j, x, out, past_states, past_outputs)``, returns that step's ``prev_sample``, where ``past_*``
    are the group's own inputs and outputs of steps 0..j-1 (what the rollout fed the sampler before).
    ``scheduler`` is used as a template (timesteps set, not stepped) and never modified. For a stochastic sampler
    ``noise_seeds`` are the batch's trajectory seeds: every step draws the noise the FP trajectory drew there.
    """

    reads_history = True
    """Marks a rollout ``phi`` that takes the group's earlier states and outputs (see :func:`rollout`)."""

    def __init__(self, scheduler: SchedulerMixin, start: int, n: int, history_states: Tensor | None = None,
                 history_outputs: Tensor | None = None, eta: float = 0.0,
                 noise_seeds: Sequence[int] | None = None) -> None:
        num_steps = scheduled_steps(scheduler)
        if n < 1:
            raise ValueError(f"group size n must be >= 1, got {n}")
        if not 0 <= start < num_steps:
            raise ValueError(f"group start {start} is outside the schedule: steps 0..{num_steps - 1} of {num_steps}")
        if start + n > num_steps:
            raise ValueError(f"a group of n={n} steps from start {start} runs past the end of the schedule "
                             f"({num_steps} steps); the largest start is {num_steps - n}")
        self.start, self.n, self.eta = start, n, eta
        self.noise_seeds = None if noise_seeds is None else [int(v) for v in noise_seeds]
        self.template = copy.deepcopy(scheduler)
        self.memoryless = history_steps(scheduler) == 0
        self.base = prime(copy.deepcopy(scheduler), start, history_states, history_outputs, eta, self.noise_seeds)
        self.timesteps = scheduler.timesteps[start : start + n]
        self._scalers: dict[int, SchedulerMixin] = {}

    def positioned(self, j: int) -> SchedulerMixin:
        """A fresh copy of the template whose next step is the group's step j (no history)."""
        return positioned_at(copy.deepcopy(self.template), self.start + j)

    def scale(self, j: int, x: Tensor) -> Tensor:
        if j not in self._scalers:
            self._scalers[j] = self.positioned(j)
        return self._scalers[j].scale_model_input(x, self.timesteps[j])

    def scheduler_before(self, j: int, past_states: Sequence[Tensor], past_outputs: Sequence[Tensor]) -> SchedulerMixin:
        """A scheduler in the state the sampler has before the group's step j, after the group's own steps < j."""
        if len(past_states) != j or len(past_outputs) != j:
            raise ValueError(f"step {j} of a group needs the {j} earlier states and outputs; got "
                             f"{len(past_states)} and {len(past_outputs)}")
        if self.memoryless:
            return self.positioned(j)
        sched = copy.deepcopy(self.base)
        for i in range(j):
            take_step(sched, past_outputs[i], self.timesteps[i], past_states[i], self.step_kwargs(i))
        return sched

    def __call__(self, j: int, x: Tensor, out: Tensor, past_states: Sequence[Tensor] = (),
                 past_outputs: Sequence[Tensor] = ()) -> Tensor:
        return take_step(self.scheduler_before(j, past_states, past_outputs), out, self.timesteps[j], x,
                         self.step_kwargs(j))

    def step_kwargs(self, j: int) -> dict:
        """``step`` arguments of the group's step j: eta and, for a stochastic sampler, the generators that give
        each trajectory the noise its FP trajectory drew at schedule step ``start + j`` (fresh on every call,
        so a replayed step draws the same noise)."""
        return step_arguments(self.template, self.start + j, self.eta, self.noise_seeds)


def group_start(scheduler: SchedulerMixin, batch: dict[str, Any], timesteps: Tensor) -> int:
    """The schedule index of the batch's first step (``step_index`` of the items, else found from the timestep)."""
    schedule = scheduler.timesteps.to(timesteps.device)
    if "step_index" in batch:
        index = torch.as_tensor(batch["step_index"]).reshape(-1)
        start = int(index[0])
        if not bool((index == start).all()):
            raise ValueError("a rollout batch must share its group start (batch items by start)")
    else:
        hits = (schedule == timesteps[0]).nonzero().flatten()
        if len(hits) != 1:
            raise ValueError(f"cannot find the batch's first timestep {timesteps[0].item()} once in the scheduler's "
                             "schedule; give the items' step_index")
        start = int(hits[0])
    n = len(timesteps)
    if not 0 <= start < len(schedule):
        raise ValueError(f"group start {start} is outside the schedule: steps 0..{len(schedule) - 1} of {len(schedule)}")
    if start + n > len(schedule):
        raise ValueError(f"a group of n={n} steps from start {start} runs past the end of the schedule "
                         f"({len(schedule)} steps)")
    if not torch.equal(schedule[start : start + n].double(), timesteps.double()):
        raise ValueError(f"the batch's timesteps {timesteps.tolist()} are not steps {start}..{start + n - 1} of the "
                         f"scheduler's schedule {schedule[start : start + n].tolist()}: trajectories and rollout must "
                         "use the same scheduler and num_inference_steps")
    return start


def fp_history(batch: dict[str, Any], key: str) -> Tensor | None:
    value = batch.get(key)
    return None if value is None else value.transpose(0, 1)  # (B, h, ...) -> (h, B, ...)


def group_steps(scheduler: SchedulerMixin, batch: dict[str, Any]) -> GroupSteps:
    """The sampler steps of a batch's group: ``scheduler`` (timesteps set, not stepped) primed at the group start
    from the batch's FP history (``history_states`` / ``history_outputs``, (B, h, ...)) when it is multistep, with
    the trajectories' step noise when a stochastic sampler drew them."""
    timesteps = batch["timesteps"][0]
    if not bool((batch["timesteps"] == timesteps).all()):
        raise ValueError("a rollout batch must share its timesteps (batch items by group start)")
    start = group_start(scheduler, batch, timesteps)
    return GroupSteps(scheduler, start, group_size(batch), fp_history(batch, "history_states"),
                      fp_history(batch, "history_outputs"), **step_noise(batch))


def step_noise(batch: dict[str, Any]) -> dict[str, Any]:
    """eta and trajectory seeds of a batch whose trajectories a stochastic sampler drew (items ``eta`` and
    ``noise_seed``, see ``TrajectoryGroups``); nothing for a deterministic sampler's batch."""
    if "noise_seed" not in batch:
        return {}
    eta = torch.as_tensor(batch["eta"]).reshape(-1)
    if not bool((eta == eta[0]).all()):
        raise ValueError("a rollout batch must share its sampler's eta")
    return {"eta": float(eta[0]), "noise_seeds": torch.as_tensor(batch["noise_seed"]).reshape(-1).tolist()}


def fp_states(batch: dict[str, Any]) -> list[Tensor]:
    """The FP states a group's n steps start from: x_k (the item's ``x``), then the cached states x_{k-1} ..
    x_{k-n+1} (all ``targets`` but the last, which no step of the group starts from)."""
    return [batch["x"], *batch["targets"].transpose(0, 1)[:-1]]


# ----- the block-output target -----
def block_rollout(student: nn.Module, teacher: nn.Module, student_block: nn.Module, teacher_block: nn.Module,
                  steps: GroupSteps, timesteps: Tensor, batch: dict[str, Any],
                  cond: Conditioning | None) -> Iterator[tuple[dict[str, Any], Tensor, Tensor]]:
    """Roll the quantized model out over the group's n steps from the FP state x_k; at each step j yield the
    student's network inputs at its rollout state xq_j, the calibrated block's output there and the FP block's
    output on the FP state x_j (the target, no graph).

    The block output keeps its graph when the caller iterates with grad enabled; the states and the rest of
    the forward carry none (``run_capturing``). The next state is computed after the caller resumes, so it may
    back-propagate and free a step's graph before the next step's forward."""
    starts = fp_states(batch)
    n = group_size(batch)
    x = batch["x"]
    states: list[Tensor] = []
    outputs: list[Tensor] = []
    for j in range(n):
        t = timesteps[j]
        with torch.no_grad():
            target = block_output(teacher, teacher_block, **network_inputs(teacher, steps.scale(j, starts[j]), t,
                                                                          cond))
        inputs = network_inputs(student, steps.scale(j, x), t, cond)
        if j == n - 1:  # the last state is not stepped on: the forward can stop at the block
            yield inputs, block_output(student, student_block, **inputs), target
            return
        out, block = run_capturing(student_block, lambda x=x, j=j, t=t: model_output(student, steps.scale(j, x), t,
                                                                                     cond))
        yield inputs, block, target
        with torch.no_grad():
            x_next = steps(j, x, out.detach(), tuple(states), tuple(outputs))
        states.append(x)
        outputs.append(out.detach())
        x = x_next
