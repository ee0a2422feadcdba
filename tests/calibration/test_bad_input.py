"""Bad input to the rollout and the calibration module: each raises a clear error naming the bad value.

Already covered elsewhere (not repeated here): ``group_size`` < 1 or larger than the schedule, unknown
``group_starts`` / ``start_weighting`` (tests/data/test_trajectories.py); unknown gradient mode or reduction in
``rollout`` (tests/calibration/test_rollout.py); unknown objective / gradient through the CLI and a stochastic
sampler (tests/calibration/test_calibration_cli.py, tests/calibration/test_multistep.py).
The data module only offers named start sets ('all', 'windows'); a numeric group start reaches the rollout
through a batch's ``step_index`` or the public ``GroupSteps`` / ``prime`` API, which are checked here.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler

from accuquant_pl.calibration.module import BlockReconstruction
from accuquant_pl.calibration.objectives import accuquant_step
from accuquant_pl.calibration.rollout import GroupSteps, rollout
from accuquant_pl.diffusion.schedulers import prime
from tests.conftest import tiny_unet

STEPS = 10


def ddim() -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(STEPS)
    return sched


def unipc() -> UniPCMultistepScheduler:
    sched = UniPCMultistepScheduler(num_train_timesteps=1000)
    sched.set_timesteps(STEPS)
    return sched


def batch(sched, start: int, n: int, b: int = 2) -> dict:
    ts = sched.timesteps[start : start + n]
    return {"x": torch.zeros(b, 1, 8, 8), "timesteps": ts[None].expand(b, -1),
            "targets": torch.zeros(b, len(ts), 1, 8, 8), "step_index": torch.full((b,), start)}


# ------------------------------------------------------------------------------------------- group size n


def test_rollout_with_no_steps_is_rejected():
    with pytest.raises(ValueError, match="group size n must be >= 1, got 0"):
        rollout("exact", lambda j, x: x, lambda j, x, out: x, torch.zeros(2, 1, 8, 8), torch.zeros(0, 2, 1, 8, 8))


def test_targets_that_do_not_match_the_state_are_rejected():
    with pytest.raises(ValueError, match=r"targets \(3, 2, 1, 4, 4\) must be \(n, \*x.shape\)"):
        rollout("exact", lambda j, x: x, lambda j, x, out: x, torch.zeros(2, 1, 8, 8), torch.zeros(3, 2, 1, 4, 4))


def test_sampler_steps_reject_n_below_one():
    with pytest.raises(ValueError, match="group size n must be >= 1, got 0"):
        GroupSteps(ddim(), 0, 0)


@pytest.mark.parametrize("start, n", [(0, STEPS + 1), (8, 3)])
def test_group_longer_than_the_rest_of_the_schedule(start, n):
    with pytest.raises(ValueError, match=rf"n={n} steps from start {start} runs past the end of the schedule "
                                         rf"\({STEPS} steps\)"):
        GroupSteps(ddim(), start, n)


def test_batch_group_past_the_end_of_the_schedule():
    sched = ddim()
    b = batch(sched, 8, 2)
    b["step_index"] = torch.full((2,), 9)  # the batch claims a later start than its timesteps fit
    with pytest.raises(ValueError, match=r"n=2 steps from start 9 runs past the end of the schedule \(10 steps\)"):
        accuquant_step(tiny_unet(), sched, b, None, "exact", "mean")


# ------------------------------------------------------------------------------------------- group start


@pytest.mark.parametrize("start", [-1, STEPS, 99])
def test_group_start_outside_the_schedule_is_named(start):
    with pytest.raises(ValueError, match=rf"group start {start} is outside the schedule: steps 0..9 of 10"):
        GroupSteps(ddim(), start, 1)
    with pytest.raises(ValueError, match=rf"group start {start} is outside the schedule"):
        prime(unipc(), start)


@pytest.mark.parametrize("start", [-2, STEPS])
def test_batch_step_index_outside_the_schedule_is_named(start):
    sched = ddim()
    b = batch(sched, 0, 1)
    b["step_index"] = torch.full((2,), start)
    with pytest.raises(ValueError, match=rf"group start {start} is outside the schedule"):
        accuquant_step(tiny_unet(), sched, b, None, "exact", "mean")


def test_batch_mixing_group_starts_is_rejected():
    sched = ddim()
    b = batch(sched, 2, 2)
    b["step_index"] = torch.tensor([2, 3])
    with pytest.raises(ValueError, match="share its group start"):
        accuquant_step(tiny_unet(), sched, b, None, "exact", "mean")


def test_batch_timesteps_of_another_schedule_are_named():
    sched = ddim()
    other = DDIMScheduler(num_train_timesteps=1000)
    other.set_timesteps(20)
    b = batch(other, 3, 2)
    b["step_index"] = torch.full((2,), 3)
    with pytest.raises(ValueError, match=r"timesteps \[800, 750\] are not steps 3..4 of the scheduler's schedule"):
        accuquant_step(tiny_unet(), sched, b, None, "exact", "mean")


def test_history_longer_than_the_steps_before_the_start():
    with pytest.raises(ValueError, match="3 history steps given for group start 2"):
        prime(unipc(), 2, torch.zeros(3, 1, 1, 8, 8), torch.zeros(3, 1, 1, 8, 8))


def test_priming_a_scheduler_without_timesteps():
    with pytest.raises(ValueError, match="UniPCMultistepScheduler has no timesteps; call set_timesteps"):
        prime(UniPCMultistepScheduler(num_train_timesteps=1000), 0)


# ------------------------------------------------------------------------------- BlockReconstruction names


def test_unknown_objective_is_named():
    with pytest.raises(ValueError, match=r"--model.init_args.objective: unknown value 'magic'; choose one of \['per_step', 'accuquant', 'rtn'\]"):
        BlockReconstruction(objective="magic")


def test_unknown_gradient_mode_is_named():
    with pytest.raises(ValueError, match=r"--model.init_args.gradient: unknown value 'fancy'; choose one of \['exact', 'checkpointed'"):
        BlockReconstruction(gradient="fancy")
