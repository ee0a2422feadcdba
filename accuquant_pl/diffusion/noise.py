"""The noise a stochastic sampler draws in its steps (DDPM, DDIM with eta > 0, ancestral and SDE solvers).

The noise of trajectory i at schedule step k comes from its own CPU generator, seeded from (the trajectory's
seed, k) (:func:`step_generators`), and reaches the scheduler through the ``generator`` list that diffusers'
``step`` hands to ``randn_tensor`` (row r drawn from generator r). So a step's noise depends on nothing but
(seed, k): not on the batch a trajectory is sampled in, its rank or device, nor on which steps ran before.
The FP trajectory cache records each trajectory's seed, and the AccuQuant rollout rebuilds, for the same
trajectory and step, exactly the noise the FP sampler drew there (docs/METHOD.md, "Stochastic samplers").
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
from collections.abc import Sequence

import torch
from diffusers import SchedulerMixin


def step_noise_seed(seed: int, step: int) -> int:
    """The generator seed of the noise that trajectory ``seed`` draws at schedule step ``step``.

    A hash rather than ``seed + step``: neighbouring trajectories must not share noise shifted by one step.
    """
    digest = hashlib.sha256(f"accuquant-step-noise:{int(seed)}:{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative 63-bit seed


def step_generators(seeds: Sequence[int], step: int) -> list[torch.Generator]:
    """One CPU generator per trajectory for the noise of schedule step ``step`` (diffusers takes the list)."""
    return [torch.Generator().manual_seed(step_noise_seed(s, step)) for s in seeds]


def step_kwargs(scheduler: SchedulerMixin, eta: float, generator: torch.Generator | list[torch.Generator] | None
                ) -> dict:
    """Keyword arguments that this scheduler's ``step`` accepts (not every scheduler takes eta or a generator)."""
    own_step = vars(scheduler).get("step")  # a step set on the instance (a wrapper) wins over the class's
    params = inspect.signature(own_step).parameters if own_step is not None else _step_parameters(type(scheduler))
    kwargs: dict = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params and generator is not None:
        kwargs["generator"] = generator
    return kwargs


@functools.cache
def _step_parameters(scheduler_class: type) -> frozenset[str]:
    # Read once per class: step_kwargs runs at every step of every sample and rollout.
    return frozenset(inspect.signature(scheduler_class.step).parameters)


def _run_schedule(scheduler: SchedulerMixin, eta: float, global_seed: int, generator_seed: int) -> torch.Tensor:
    """The states of the whole schedule on a tiny input, under the given global and per-step generator seeds."""
    sched = copy.deepcopy(scheduler)
    x = torch.full((2, 1, 2, 2), 0.5)
    states = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        for k, t in enumerate(sched.timesteps):
            out = 0.1 * sched.scale_model_input(x, t) + 0.05
            extra = step_kwargs(sched, eta, step_generators([generator_seed, generator_seed + 1], k))
            x = sched.step(out, t, x, **extra).prev_sample
            states.append(x)
    return torch.stack(states)


def is_stochastic(scheduler: SchedulerMixin, eta: float = 0.0) -> bool:
    """Whether ``scheduler.step`` (with ``eta`` where it takes one) draws noise: two runs of the whole schedule on a
    tiny input with different generators and global seeds are compared. ``scheduler`` is not modified."""
    return not torch.equal(_run_schedule(scheduler, eta, 0, 0), _run_schedule(scheduler, eta, 1, 1))


def noise_is_replayable(scheduler: SchedulerMixin, eta: float = 0.0) -> bool:
    """Whether every draw of ``scheduler.step`` comes from the generators it is given: the same per-step generators
    under two different global seeds must give the same states (a custom ``step`` that calls ``torch.randn``
    without the generator fails). ``scheduler`` is not modified."""
    return torch.equal(_run_schedule(scheduler, eta, 0, 7), _run_schedule(scheduler, eta, 1, 7))


def check_replayable(scheduler: SchedulerMixin, eta: float) -> bool:
    """Raise ``ValueError`` naming the scheduler when it draws noise that its ``generator`` does not control;
    else return whether it draws noise at all (:func:`is_stochastic`, so callers need not probe twice)."""
    stochastic = is_stochastic(scheduler, eta)
    if stochastic and not noise_is_replayable(scheduler, eta):
        raise ValueError(
            f"{type(scheduler).__name__} (eta={eta}) draws noise in its steps that the generator passed to step() "
            "does not control (it reads the global RNG), so the noise of a trajectory's step cannot be replayed: "
            "the FP trajectories could not be reproduced and the AccuQuant rollout could not meet them with the "
            "same noise. Use a scheduler whose step draws its noise from the generator argument (every diffusers "
            "scheduler does), or a deterministic one (ddim with eta: 0, dpmsolver++, unipc, pndm, euler)"
        )
    return stochastic
