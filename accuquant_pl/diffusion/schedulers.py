"""Everything this project knows about diffusers schedulers: the ones it builds by name, the arguments their
``step`` takes, whether they draw noise, and the real sampler's steps for an AccuQuant group that starts mid-trajectory (docs/METHOD.md, "Multistep schedulers").

A diffusers scheduler is a state machine: multistep solvers (DPM-Solver++, UniPC, PNDM) keep the converted
outputs of earlier steps, a warm-up counter, the previous (corrected) sample, a step index. A group that
starts at schedule step k must see the state the sampler has there. :func:`prime` reconstructs it with the
scheduler's *own* ``step``: it replays the steps before k on the FP states and model outputs stored in the
trajectory cache (results discarded, side effects kept). No solver maths is copied here, so any deterministic
scheduler works; for a few known ones a short replay window suffices (:func:`history_steps`).

:class:`SamplerSteps` is the rollout's ``phi`` for one group: step j is taken on a copy of the primed
scheduler after replaying the group's own earlier steps j' < j (the quantized states and outputs, with their
autograd graph), so every call is a pure function of its tensor inputs and the gradient modes may replay and
differentiate it.
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


def _num_steps(scheduler: SchedulerMixin) -> int:
    if getattr(scheduler, "timesteps", None) is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(f"{type(scheduler).__name__} has no timesteps; call set_timesteps before priming it")
    return len(scheduler.timesteps)


def _position(scheduler: SchedulerMixin, index: int) -> SchedulerMixin:
    """Tell a fresh scheduler that its next step is schedule step ``index`` (diffusers' public ``set_begin_index``;
    schedulers without it take their position from the timestep, or keep none)."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)
    return scheduler


def scaled_model_input(scheduler: SchedulerMixin, index: int, x: Tensor) -> Tensor:
    """``x`` as the sampler feeds it to the network at schedule step ``index`` (``scale_model_input``: identity for
    DDIM and DPM-Solver, x / sqrt(sigma^2 + 1) for Euler-type samplers). ``scheduler`` is not modified."""
    num_steps = _num_steps(scheduler)
    if not 0 <= index < num_steps:
        raise ValueError(f"step {index} is outside the schedule: steps 0..{num_steps - 1} of {num_steps}")
    return _position(copy.deepcopy(scheduler), index).scale_model_input(x, scheduler.timesteps[index])


def scales_model_input(scheduler: SchedulerMixin) -> bool:
    """Whether sampling with ``scheduler`` scales the initial noise (``init_noise_sigma``) or the network input
    (``scale_model_input``): Euler-type samplers do, DDPM, DDIM, DPM-Solver, UniPC, PNDM and LCM do not. A loop that
    does neither (DDPMPipeline's) samples the latter correctly and the former wrong. ``scheduler`` is not modified."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(10)
    x = torch.ones(1, 1, 2, 2)
    return float(probe.init_noise_sigma) != 1.0 or not torch.equal(scaled_model_input(probe, 0, x), x)


def _kwargs_at(scheduler: SchedulerMixin, index: int, eta: float, noise_seeds: Sequence[int] | None) -> dict:
    """``step`` arguments of schedule step ``index``: eta, and the generators of the trajectories' noise there
    (``noise.step_generators``) when the trajectories were sampled with a stochastic sampler."""
    return step_kwargs(scheduler, eta, None if noise_seeds is None else step_generators(noise_seeds, index))


def _step(scheduler: SchedulerMixin, out: Tensor, t: Tensor, x: Tensor, kwargs: dict) -> Tensor:
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
    num_steps = _num_steps(scheduler)
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
    _position(scheduler, first)
    for i in range(h):
        _step(scheduler, outputs[i], scheduler.timesteps[first + i], states[i],
              _kwargs_at(scheduler, first + i, eta, noise_seeds))
    return scheduler


class SamplerSteps:
    """The real sampler's steps ``start .. start + n - 1`` of one group, primed from the FP trajectory cache.

    ``scale(j, x)`` is the model input at the group's step j (``scale_model_input``); calling the object,
    ``steps(j, x, out, past_states, past_outputs)``, returns that step's ``prev_sample``, where ``past_*``
    are the group's own inputs and outputs of steps 0..j-1 (what the rollout fed the sampler before).
    ``scheduler`` is used as a template (timesteps set, not stepped) and never modified. For a stochastic sampler
    ``noise_seeds`` are the batch's trajectory seeds: every step draws the noise the FP trajectory drew there.
    """

    reads_history = True
    """Marks a rollout ``phi`` that takes the group's earlier states and outputs (see ``rollout.py``)."""

    def __init__(self, scheduler: SchedulerMixin, start: int, n: int, history_states: Tensor | None = None,
                 history_outputs: Tensor | None = None, eta: float = 0.0,
                 noise_seeds: Sequence[int] | None = None) -> None:
        num_steps = _num_steps(scheduler)
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
        return _position(copy.deepcopy(self.template), self.start + j)

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
            _step(sched, past_outputs[i], self.timesteps[i], past_states[i], self.step_kwargs(i))
        return sched

    def __call__(self, j: int, x: Tensor, out: Tensor, past_states: Sequence[Tensor] = (),
                 past_outputs: Sequence[Tensor] = ()) -> Tensor:
        return _step(self.scheduler_before(j, past_states, past_outputs), out, self.timesteps[j], x,
                     self.step_kwargs(j))

    def step_kwargs(self, j: int) -> dict:
        """``step`` arguments of the group's step j: eta and, for a stochastic sampler, the generators that give
        each trajectory the noise its FP trajectory drew at schedule step ``start + j`` (fresh on every call,
        so a replayed step draws the same noise)."""
        return _kwargs_at(self.template, self.start + j, self.eta, self.noise_seeds)
