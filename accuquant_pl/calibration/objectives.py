"""The calibration objectives on a batch of trajectory items, as losses that call backward: ``per_step``
(Q-Diffusion/BRECQ), ``accuquant`` on the state or the block output (the rollouts of ``calibration/rollout.py``)
and the final stage, and :func:`epoch_objective`, which of them an epoch runs."""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import SchedulerMixin
from torch import Tensor, nn

from accuquant_pl.calibration.capture import block_output
from accuquant_pl.calibration.rollout import (
    Reduction,
    block_rollout,
    fp_states,
    group_size,
    group_start,
    group_steps,
    rollout,
    state_loss,
)
from accuquant_pl.diffusion.conditioning import Conditioning
from accuquant_pl.diffusion.noise import check_replayable
from accuquant_pl.diffusion.sampling import model_output, network_inputs
from accuquant_pl.diffusion.schedulers import scaled_model_input

Objective = Literal["per_step", "accuquant"]
OBJECTIVES = ("per_step", "accuquant")
RolloutTarget = Literal["state", "block_output", "block_accumulated"]
ROLLOUT_TARGETS = ("state", "block_output", "block_accumulated")
BLOCK_TARGETS = ("block_output", "block_accumulated")
"""Rollout targets on the calibrated block's output: their gradient holds the rollout's states constant."""


def per_step_loss(student: nn.Module, teacher: nn.Module, student_block: nn.Module, teacher_block: nn.Module,
                  scheduler: SchedulerMixin, batch: dict[str, Any], cond: Conditioning | None,
                  reduction: Reduction) -> Tensor:
    """Block-output MSE on (x_k, t_k): the quantized model's block on its own input vs the FP block on the FP input.

    The network sees x_k as the sampler feeds it, through ``scheduler.scale_model_input`` at step k (identity
    for DDIM and DPM-Solver, a sigma scaling for Euler-type samplers). Under classifier-free guidance the
    network inputs are the sampler's doubled [uncond, cond] batch (``network_inputs``), so both halves of
    what the guided sampler evaluates are reconstructed."""
    t = batch["timesteps"][:, 0]
    if not bool((t == t[0]).all()):
        raise ValueError("a per-step batch must share its timestep (batch items by step)")
    x = scaled_model_input(scheduler, group_start(scheduler, batch, t[:1]), batch["x"])
    with torch.no_grad():
        target = block_output(teacher, teacher_block, **network_inputs(teacher, x, t, cond))
    out = block_output(student, student_block, **network_inputs(student, x, t, cond))
    return state_loss(out, target, reduction)


def check_rollout_scheduler(scheduler: SchedulerMixin, eta: float, serves_step_noise: bool) -> None:
    """The rollout replays and differentiates scheduler steps, so each must be a function of its tensor inputs and
    of noise the rollout can rebuild. Multistep schedulers are primed from the FP cache; a stochastic sampler
    (DDPM, DDIM with eta > 0, ancestral/SDE solvers) gets, per trajectory and step, the noise its FP trajectory
    drew (``diffusion/noise.py``), which the data module must serve with its items (``serves_step_noise``).
    Rejected: a sampler whose step draws noise its ``generator`` does not control, or data without that noise."""
    if check_replayable(scheduler, eta) and not serves_step_noise:
        raise ValueError(
            f"{type(scheduler).__name__} with eta={eta} draws noise in its steps, but the data module does not serve "
            "each trajectory's step noise (items 'noise_seed' and 'eta', as TrajectoryDataModule does), so the "
            "quantized rollout could not meet the FP trajectories with the same noise"
        )


def accuquant_step(student: nn.Module, scheduler: SchedulerMixin, batch: dict[str, Any], cond: Conditioning | None,
                   gradient: str, reduction: Reduction, scale: float = 1.0, recompute: bool = True) -> Tensor:
    """Roll the quantized model out over the batch's n steps from the FP state; backward per ``gradient`` mode.

    Every item of a batch starts at the same step (the data module batches by start), so the scheduler's
    scalar-timestep ``step`` applies to the whole batch. ``scheduler`` (timesteps set, not stepped) is a
    template: the rollout steps copies primed at the group start from the batch's FP history
    (``history_states`` / ``history_outputs``, (B, h, ...)) when the sampler is multistep. ``recompute``: see
    :func:`~accuquant_pl.calibration.rollout.rollout_approx`.
    """
    targets = batch["targets"].transpose(0, 1)  # (n, B, C, H, W)
    steps = group_steps(scheduler, batch)
    timesteps = batch["timesteps"][0]  # equal to steps.timesteps, on the batch's device

    def network(j: int, x: Tensor) -> Tensor:
        return model_output(student, steps.scale(j, x), timesteps[j], cond)

    return rollout(gradient, network, steps, batch["x"], targets, reduction, scale, recompute)


def accuquant_block_step(student: nn.Module, teacher: nn.Module, student_block: nn.Module, teacher_block: nn.Module,
                         scheduler: SchedulerMixin, batch: dict[str, Any], cond: Conditioning | None,
                         reduction: Reduction, scale: float = 1.0) -> Tensor:
    """AccuQuant with block-output targets (``rollout_target='block_output'``, docs/METHOD.md).

    The quantized model is rolled out over the batch's n steps from the FP state x_k, as for the state
    target; at every step j the calibrated block's output on the quantized rollout's state xq_j is matched
    to the FP block's output on the FP trajectory's state x_j. The block therefore learns on the inputs the
    quantized sampler actually produces after j steps of its own error, against what the FP sampler computes
    there. The gradient stops at the block's input (the rollout's states are constants, as in the per-step
    objective), each step's graph is freed by its backward (O(1) memory in n), and the loss is the mean over
    the n steps, so that n = 1 is exactly the per-step objective on group starts.
    """
    steps = group_steps(scheduler, batch)
    timesteps = batch["timesteps"][0]
    n = group_size(batch)
    total = torch.zeros((), device=batch["x"].device)
    for _, block, target in block_rollout(student, teacher, student_block, teacher_block, steps, timesteps, batch,
                                           cond):
        loss = state_loss(block, target, reduction) / n
        (loss * scale).backward()
        total = total + loss.detach()
    return total


def group_block_loss(student: nn.Module, teacher: nn.Module, student_block: nn.Module, teacher_block: nn.Module,
                     scheduler: SchedulerMixin, batch: dict[str, Any], cond: Conditioning | None,
                     reduction: Reduction, scale: float = 1.0) -> Tensor:
    """The per-step objective on each FP state x_k .. x_{k-n+1} of a group (mean over the n steps), backward per step.

    Added to the AccuQuant state loss with ``block_loss_weight`` > 0: the dense block-output signal of the
    per-step objective, while the state term adds what the n-step rollout sees.
    """
    n = group_size(batch)
    total = torch.zeros((), device=batch["x"].device)
    for j, state in enumerate(fp_states(batch)):
        item = {"x": state, "timesteps": batch["timesteps"][:, j:]}
        if "step_index" in batch:
            item["step_index"] = torch.as_tensor(batch["step_index"]) + j
        loss = per_step_loss(student, teacher, student_block, teacher_block, scheduler, item, cond, reduction) / n
        (loss * scale).backward()
        total = total + loss.detach()
    return total


def accuquant_block_accumulated_step(student: nn.Module, teacher: nn.Module, student_block: nn.Module,
                                     teacher_block: nn.Module, scheduler: SchedulerMixin, batch: dict[str, Any],
                                     cond: Conditioning | None, reduction: Reduction, scale: float = 1.0) -> Tensor:
    """AccuQuant with the block's error accumulated along the rollout (``rollout_target='block_accumulated'``).

    As ``accuquant_block_step``, the quantized model is rolled out n steps from the FP state and the block's
    output at each rollout state xq_j is compared with the FP block's output on the FP state x_j; but the loss
    is on the *mean* of the n errors, L = ||(1/n) sum_j e_j||^2, instead of the mean of their squares. The
    sampler adds the steps' errors up, so an error that keeps its sign from step to step (a bias) grows the
    final error quadratically in the number of steps while one that changes sign cancels: the mean-of-squares
    loss weighs both alike, this loss only what survives the sum over n consecutive steps. n = 1 is the
    per-step objective.

    Memory is O(1) in n: pass 1 (no graph) rolls out and keeps the n block errors (block-sized tensors) and
    their mean; the loss's gradient with respect to that mean is shared by every step, and pass 2 recomputes
    each step's block output with its graph and back-propagates it there, one step at a time.
    """
    steps = group_steps(scheduler, batch)
    timesteps = batch["timesteps"][0]
    n = group_size(batch)
    inputs: list[dict[str, Any]] = []
    error_sum: Tensor | None = None
    with torch.no_grad():
        for step_inputs, block, target in block_rollout(student, teacher, student_block, teacher_block, steps,
                                                         timesteps, batch, cond):
            inputs.append(step_inputs)
            error = block - target
            error_sum = error if error_sum is None else error_sum + error
    mean_error = (error_sum / n).requires_grad_(True)
    with torch.enable_grad():
        loss = state_loss(mean_error, torch.zeros_like(mean_error), reduction)
        (grad_mean,) = torch.autograd.grad(loss, mean_error)
    for j in range(n):  # d mean / d block_j = 1/n
        block = block_output(student, student_block, **inputs[j])
        block.backward(grad_mean * (scale / n))
    return loss.detach()


FINAL_STAGE = "final_stage"
"""The name of the whole-model epoch after the last unit (with a ``final_stage``) in ``epoch_names``."""

def epoch_objective(settings: Any, student: nn.Module, teacher: nn.Module | None, name: str, unit: nn.Module,
                    scheduler: SchedulerMixin, batch: dict[str, Any], cond: Conditioning | None, share: float,
                    backward: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Back-propagate ``share`` times the objective of the epoch that calibrates ``name`` (a unit, or
    ``FINAL_STAGE``) on one single-start batch; return its (unscaled) loss and, for the state target, its
    weighted terms. ``settings`` is the module's :class:`~accuquant_pl.calibration.config.CalibrationSettings`;
    ``backward`` runs a backward pass the way the LightningModule must (``manual_backward``)."""
    reduction, ab = settings.ablations.loss_reduction, settings.ablations
    if name == FINAL_STAGE:
        stage = settings.final_stage
        return accuquant_step(student, scheduler, batch, cond, stage.gradient, reduction, share, stage.recompute), {}
    teacher_block = teacher.get_submodule(name) if teacher is not None else None
    if settings.objective == "per_step":
        loss = per_step_loss(student, teacher, unit, teacher_block, scheduler, batch, cond, reduction)
        backward(loss * share)
        return loss.detach(), {}
    if settings.rollout_target in BLOCK_TARGETS:
        step = accuquant_block_step if settings.rollout_target == "block_output" else accuquant_block_accumulated_step
        return step(student, teacher, unit, teacher_block, scheduler, batch, cond, reduction, share), {}
    # Each term calls backward itself (scaled by its weight); the logged loss is their weighted sum.
    terms: dict[str, Tensor] = {}
    if ab.state_loss_weight > 0:
        terms["calib/state_loss"] = accuquant_step(student, scheduler, batch, cond, settings.gradient, reduction,
                                                   ab.state_loss_weight * share)
    if ab.block_loss_weight > 0:
        terms["calib/block_loss"] = group_block_loss(student, teacher, unit, teacher_block, scheduler, batch, cond,
                                                     reduction, ab.block_loss_weight * share)
    loss = (ab.state_loss_weight * terms.get("calib/state_loss", 0.0)
            + ab.block_loss_weight * terms.get("calib/block_loss", 0.0))
    return loss, terms
