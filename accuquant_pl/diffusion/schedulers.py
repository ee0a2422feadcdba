"""Everything this project knows about diffusers schedulers: the ones it builds by name, the arguments their
``step`` takes, whether they draw noise, and how to bring one to a step in the middle of a trajectory (docs/METHOD.md, "Multistep schedulers").

A diffusers scheduler is a state machine: multistep solvers (DPM-Solver++, UniPC, PNDM) keep the converted
outputs of earlier steps, a warm-up counter, the previous (corrected) sample, a step index. A group that
starts at schedule step k must see the state the sampler has there. :func:`prime` reconstructs it with the
scheduler's *own* ``step``: it replays the steps before k on the FP states and model outputs stored in the
trajectory cache (results discarded, side effects kept). No solver maths is copied here, so any deterministic
scheduler works; for a few known ones a short replay window suffices (:func:`history_steps`).
The rollout's steps of one group (``calibration/rollout.py``, ``GroupSteps``) are built on :func:`prime`,
:func:`positioned_at` and :func:`take_step`.
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from torch import Tensor

from accuquant_pl.diffusion.noise import step_generators, step_kwargs

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}


# Samplers that are one of SCHEDULERS with a config setting changed. A name, rather than a free dict of config
# overrides, keeps every place that takes a scheduler (trajectories, predict, test, the cache key) in one string.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sde-dpmsolver++": ("dpmsolver++", {"algorithm_type": "sde-dpmsolver++"}),  # DPM-Solver++ that draws noise
}


def scheduler_names() -> list[str]:
    """Every name :func:`scheduler_from_config` takes."""
    return sorted([*SCHEDULERS, *VARIANTS])


IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _scheduler_class(path: str) -> type[SchedulerMixin]:
    """A scheduler class by import path (``diffusers.LCMScheduler``, ``my_package.MySampler``)."""
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"unknown scheduler {path!r}: cannot import it ({err}); the names are "
                         f"{scheduler_names()}") from err
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"scheduler {path!r} is not a diffusers scheduler (a SchedulerMixin subclass)")
    return cls


def scheduler_from_config(name: str, config: dict[str, Any], **overrides: Any) -> SchedulerMixin:
    """Build the named diffusers scheduler (``SCHEDULERS``, ``VARIANTS``, or any scheduler class by import path,
    e.g. ``diffusers.LCMScheduler``) from a (possibly different) scheduler's config."""
    if name in VARIANTS:
        base, settings = VARIANTS[name]
        return scheduler_from_config(base, config, **{**settings, **overrides})
    if name in SCHEDULERS:
        return SCHEDULERS[name].from_config(config, **overrides)
    if IMPORT_PATH.match(name):
        return _scheduler_class(name).from_config(config, **overrides)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {scheduler_names()} or a scheduler class's import "
                     "path (diffusers.<Name>Scheduler)")


# Schedulers whose step reads nothing from earlier steps except their position in the schedule.
ONE_STEP: tuple[type[SchedulerMixin], ...] = (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler,
                                              EulerAncestralDiscreteScheduler)


def history_steps(scheduler: SchedulerMixin) -> int:
    """How many FP steps before a group start :func:`prime` must replay for ``scheduler`` (timesteps set).

    0 for one-step samplers; ``solver_order - 1`` for DPM-Solver multistep (its state is the last outputs and a
    warm-up counter that saturates); the whole schedule otherwise: UniPC's corrector chains the previous
    corrected sample through every step, and for an unknown scheduler a full replay is the safe choice.
    ``tests/calibration/test_multistep.py`` checks every window against the sampler at every start.
    """
    if isinstance(scheduler, ONE_STEP):
        return 0
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return int(scheduler.config.solver_order) - 1
    return len(scheduler.timesteps)


def scheduled_steps(scheduler: SchedulerMixin) -> int:
    if getattr(scheduler, "timesteps", None) is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(f"{type(scheduler).__name__} has no timesteps; call set_timesteps before priming it")
    return len(scheduler.timesteps)


def positioned_at(scheduler: SchedulerMixin, index: int) -> SchedulerMixin:
    """Tell a fresh scheduler that its next step is schedule step ``index`` (diffusers' public ``set_begin_index``;
    schedulers without it take their position from the timestep, or keep none)."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)
    return scheduler


def scaled_model_input(scheduler: SchedulerMixin, index: int, x: Tensor) -> Tensor:
    """``x`` as the sampler feeds it to the network at schedule step ``index`` (``scale_model_input``: identity for
    DDIM and DPM-Solver, x / sqrt(sigma^2 + 1) for Euler-type samplers). ``scheduler`` is not modified."""
    num_steps = scheduled_steps(scheduler)
    if not 0 <= index < num_steps:
        raise ValueError(f"step {index} is outside the schedule: steps 0..{num_steps - 1} of {num_steps}")
    return positioned_at(copy.deepcopy(scheduler), index).scale_model_input(x, scheduler.timesteps[index])


def scales_model_input(scheduler: SchedulerMixin) -> bool:
    """Whether sampling with ``scheduler`` scales the initial noise (``init_noise_sigma``) or the network input
    (``scale_model_input``): Euler-type samplers do, DDPM, DDIM, DPM-Solver, UniPC, PNDM and LCM do not. A loop that
    does neither (DDPMPipeline's) samples the latter correctly and the former wrong. ``scheduler`` is not modified."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(10)
    x = torch.ones(1, 1, 2, 2)
    return float(probe.init_noise_sigma) != 1.0 or not torch.equal(scaled_model_input(probe, 0, x), x)


def step_arguments(scheduler: SchedulerMixin, index: int, eta: float, noise_seeds: Sequence[int] | None) -> dict:
    """``step`` arguments of schedule step ``index``: eta, and the generators of the trajectories' noise there
    (``noise.step_generators``) when the trajectories were sampled with a stochastic sampler."""
    return step_kwargs(scheduler, eta, None if noise_seeds is None else step_generators(noise_seeds, index))


def take_step(scheduler: SchedulerMixin, out: Tensor, t: Tensor, x: Tensor, kwargs: dict) -> Tensor:
    """One sampler step with the call sequence of ``sampling.sample`` (``scale_model_input`` first: some
    schedulers track that it was called)."""
    with torch.no_grad():
        scheduler.scale_model_input(x.detach(), t)
    return scheduler.step(out, t, x, **kwargs).prev_sample


@torch.no_grad()
def prime(scheduler: SchedulerMixin, start: int, states: Tensor | None = None, outputs: Tensor | None = None,
          eta: float = 0.0, noise_seeds: Sequence[int] | None = None) -> SchedulerMixin:
    """Bring ``scheduler`` (fresh, timesteps set) to schedule step ``start`` as the sampler is there, in place.

    ``states`` and ``outputs`` are (h, B, ...): the FP sampler's inputs x and model outputs at steps
    ``start - h .. start - 1`` (h >= ``min(start, history_steps(scheduler))``); they are fed to the scheduler's
    own ``step`` (with ``eta`` and the noise of ``noise_seeds``' trajectories at those steps) and its results are
    discarded. Returns ``scheduler``.
    """
    num_steps = scheduled_steps(scheduler)
    if not 0 <= start < num_steps:
        raise ValueError(f"group start {start} is outside the schedule: steps 0..{num_steps - 1} of {num_steps}")
    h = 0 if outputs is None else len(outputs)
    if (states is None) != (outputs is None) or (states is not None and len(states) != h):
        raise ValueError("priming needs the FP states and model outputs of the same steps")
    needed = min(start, history_steps(scheduler))
    if h < needed:
        raise ValueError(
            f"{type(scheduler).__name__} needs the FP states and model outputs of the {needed} steps before group "
            f"start {start} to resume the sampler there; got {h}. Build the trajectory cache with "
            "keep_model_outputs=True and serve the history with the items (TrajectoryDataModule does)"
        )
    if h > start:
        raise ValueError(f"{h} history steps given for group start {start}: there are only {start} steps before it")
    first = start - h
    positioned_at(scheduler, first)
    for i in range(h):
        take_step(scheduler, outputs[i], scheduler.timesteps[first + i], states[i],
                  step_arguments(scheduler, first + i, eta, noise_seeds))
    return scheduler
