"""Calibration objectives on a batch of trajectory items: ``per_step`` (Q-Diffusion/BRECQ) and ``accuquant``."""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from torch import Tensor, nn

from accuquant_pl.calibration.capture import block_output
from accuquant_pl.calibration.rollout import Reduction, rollout, state_loss
from accuquant_pl.sampling import Conditioning, model_output

Objective = Literal["per_step", "accuquant"]
OBJECTIVES = ("per_step", "accuquant")


def _forward_kwargs(x: Tensor, t: Tensor, cond: Conditioning | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"sample": x, "timestep": t}
    if cond is not None:
        kwargs.update(cond.kwargs())
    return kwargs


def per_step_loss(student: nn.Module, teacher: nn.Module, student_block: nn.Module, teacher_block: nn.Module,
                  batch: dict[str, Any], cond: Conditioning | None, reduction: Reduction) -> Tensor:
    """Block-output MSE on (x_k, t_k): the quantized model's block on its own input vs the FP block on the FP input."""
    x, t = batch["x"], batch["timesteps"][:, 0]
    with torch.no_grad():
        target = block_output(teacher, teacher_block, **_forward_kwargs(x, t, cond))
    out = block_output(student, student_block, **_forward_kwargs(x, t, cond))
    return state_loss(out, target, reduction)


def check_rollout_scheduler(scheduler: SchedulerMixin, eta: float) -> None:
    """The rollout replays and differentiates scheduler steps, so they must be pure functions of (x, output)."""
    if not isinstance(scheduler, DDIMScheduler) or eta != 0.0:
        raise ValueError(
            f"the accuquant rollout supports the deterministic DDIM sampler (eta=0); got "
            f"{type(scheduler).__name__} with eta={eta}. Stochastic and multistep samplers keep state between "
            "steps that the gradient modes would replay; calibrate with scheduler: ddim"
        )


def accuquant_step(student: nn.Module, scheduler: SchedulerMixin, batch: dict[str, Any], cond: Conditioning | None,
                   gradient: str, reduction: Reduction, scale: float = 1.0) -> Tensor:
    """Roll the quantized model out over the batch's n steps from the FP state; backward per ``gradient`` mode.

    Every item of a batch starts at the same step (the data module batches by start), so the scheduler's
    scalar-timestep ``step`` applies to the whole batch.
    """
    timesteps = batch["timesteps"][0]
    if not bool((batch["timesteps"] == timesteps).all()):
        raise ValueError("a rollout batch must share its timesteps (batch items by group start)")
    targets = batch["targets"].transpose(0, 1)  # (n, B, C, H, W)

    def network(j: int, x: Tensor) -> Tensor:
        t = timesteps[j]
        return model_output(student, scheduler.scale_model_input(x, t), t, cond)

    def phi(j: int, x: Tensor, out: Tensor) -> Tensor:
        return scheduler.step(out, timesteps[j], x).prev_sample

    return rollout(gradient, network, phi, batch["x"], targets, reduction, scale)
