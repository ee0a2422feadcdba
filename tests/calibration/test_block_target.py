"""AccuQuant with block-output targets (objectives.accuquant_block_step, rollout_target='block_output').

Set-up: a tiny UNet2DModel quantized W4A8 with AdaRound (theta = AdaRound V + activation step sizes), a tiny
FP teacher, a real DDIMScheduler (eta = 0, 10 steps). The references are computed by hand from
``block_output`` and ``scheduler.step``, without ``accuquant_block_step``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from torch import Tensor, nn

from accuquant_pl.calibration import Ablations
from accuquant_pl.calibration.capture import block_output, run_capturing
from accuquant_pl.calibration.module import BlockReconstruction
from accuquant_pl.calibration.objectives import (
    accuquant_block_accumulated_step,
    accuquant_block_step,
    group_block_loss,
    per_step_loss,
)
from accuquant_pl.calibration.rollout import state_loss
from accuquant_pl.cli import main
from accuquant_pl.diffusion.sampling import network_inputs
from accuquant_pl.quant import QuantSpec, calibrate_activations, quantize, unit_parameters
from benchmarks.memory import SavedTensorBytes
from tests.calibration.gradients import flat_grad, theta, zero
from tests.calibration.test_calibration_cli import tiny_args
from tests.conftest import tiny_unet

START = 2
UNIT = "down_blocks.1.attentions.0"  # an attention unit in the middle of the network


def ddim() -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(10)
    return sched


def quantized(teacher: nn.Module) -> nn.Module:
    # One activation range: the objectives' equalities below hold to float rounding, and timestep groups let the
    # per-sample and the whole-batch paths sum a step size's gradient in different orders.
    student = quantize(copy.deepcopy(teacher), QuantSpec(weight_bits=4, act_bits=8, adaround=True,
                                                         act_timestep_groups=1))
    gen = torch.Generator().manual_seed(5)
    calibrate_activations(student, [{"sample": torch.randn(4, 1, 8, 8, generator=gen), "timestep": t}
                                    for t in ddim().timesteps[::2]])
    student.requires_grad_(False)
    for params in unit_parameters(student.get_submodule(UNIT)).values():
        for p in params:
            p.requires_grad_(True)
    return student


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    teacher = tiny_unet(seed=0).eval().requires_grad_(False)
    return quantized(teacher), teacher


def batch_for(teacher: nn.Module, n: int, size: int = 4) -> dict[str, Tensor]:
    """A data-module batch: FP start states at step START and the FP states after each of the n steps."""
    sched = ddim()
    x = torch.randn(size, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    targets, state = [], x
    with torch.no_grad():
        for j in range(n):
            t = sched.timesteps[START + j]
            state = sched.step(teacher(state, t).sample, t, state).prev_sample
            targets.append(state)
    timesteps = sched.timesteps[START:START + n]
    return {"x": x, "timesteps": timesteps[None].expand(size, -1), "targets": torch.stack(targets, 1),
            "step_index": torch.full((size,), START)}


def grads(params: list[nn.Parameter]) -> Tensor:
    """The flat gradient, then reset, so the next computation starts from zero."""
    out = flat_grad(params)
    zero(params)
    return out


def step(student: nn.Module, teacher: nn.Module, batch: dict) -> Tensor:
    return accuquant_block_step(student, teacher, student.get_submodule(UNIT), teacher.get_submodule(UNIT), ddim(),
                                batch, None, "mean")


def euler_batch(size: int = 4) -> tuple[EulerDiscreteScheduler, dict[str, Tensor]]:
    sched = EulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(10)
    x = 3.0 * torch.randn(size, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return sched, {"x": x, "timesteps": sched.timesteps[START:START + 1][None].expand(size, -1),
                   "step_index": torch.full((size,), START)}


def test_per_step_feeds_the_network_the_samplers_scaled_input(models):
    # Euler's sampler feeds the network x / sqrt(sigma^2 + 1): the per-step target must be the block's output
    # on that input, as in the rollout, or per-step calibrates on inputs the sampler never produces.
    student, teacher = models
    sb, tb = student.get_submodule(UNIT), teacher.get_submodule(UNIT)
    sched, batch = euler_batch()
    t = batch["timesteps"][0, 0]
    x_in = batch["x"] / (sched.sigmas[START] ** 2 + 1) ** 0.5
    with torch.no_grad():
        ref = state_loss(block_output(student, sb, **network_inputs(student, x_in, t)),
                         block_output(teacher, tb, **network_inputs(teacher, x_in, t)))
        unscaled = state_loss(block_output(student, sb, **network_inputs(student, batch["x"], t)),
                              block_output(teacher, tb, **network_inputs(teacher, batch["x"], t)))
        loss = per_step_loss(student, teacher, sb, tb, sched, batch, None, "mean")
    assert abs(float(unscaled) - float(ref)) > 1e-3 * float(ref)  # the scaling matters at this step
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    block_n1 = accuquant_block_step(student, teacher, sb, tb, sched, {**batch, "targets": batch["x"][:, None]},
                                    None, "mean")  # calls backward: reset the gradients it leaves
    zero(theta(student))
    torch.testing.assert_close(block_n1, ref, rtol=1e-6, atol=0)


def test_n1_is_the_per_step_objective(models):
    student, teacher = models
    batch = batch_for(teacher, 1)
    params = theta(student)
    loss = step(student, teacher, batch)
    got = grads(params)
    ref = per_step_loss(student, teacher, student.get_submodule(UNIT), teacher.get_submodule(UNIT), ddim(), batch,
                        None, "mean")
    ref.backward()
    want = grads(params)
    assert float(ref.detach()) > 0 and want.norm() > 0
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7 * float(want.norm()))


def hand_block_errors(student: nn.Module, teacher: nn.Module, batch: dict, n: int) -> tuple[list[Tensor], Tensor]:
    """Reference errors e_j of the unit's output along the quantized model's own DDIM rollout, by hand: the
    student's block on its rollout state (with graph; the states carry none) minus the FP block on the FP state.
    Also returns the rollout's last state."""
    sched = ddim()
    sb, tb = student.get_submodule(UNIT), teacher.get_submodule(UNIT)
    fp_states = [batch["x"], *batch["targets"].transpose(0, 1)[:-1]]
    x, errors = batch["x"], []
    for j in range(n):
        t = sched.timesteps[START + j]
        with torch.no_grad():
            target = block_output(teacher, tb, sample=fp_states[j], timestep=t)
        errors.append(block_output(student, sb, sample=x, timestep=t) - target)
        with torch.no_grad():
            x = sched.step(student(x, t).sample, t, x).prev_sample
    return errors, x


@pytest.mark.parametrize("n", [2, 3])
def test_matches_a_hand_rollout_of_the_quantized_model(n, models):
    student, teacher = models
    batch = batch_for(teacher, n)
    params = theta(student)
    errors, x = hand_block_errors(student, teacher, batch, n)
    ref = torch.stack([e.pow(2).mean() for e in errors]).mean()
    ref.backward()
    want = grads(params)
    loss = step(student, teacher, batch)
    got = grads(params)
    assert want.norm() > 0
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.norm()))
    # The quantized rollout really left the FP trajectory, so the reference above is not the FP-state loss.
    assert float((x - batch["targets"][:, -1]).abs().max()) > 1e-4


# -------------------------------------------------- block errors accumulated along the rollout (block_accumulated)
def accumulated(student: nn.Module, teacher: nn.Module, batch: dict, reduction: str = "mean") -> Tensor:
    return accuquant_block_accumulated_step(student, teacher, student.get_submodule(UNIT), teacher.get_submodule(UNIT),
                                            ddim(), batch, None, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum_per_sample"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_accumulated_is_the_loss_on_the_mean_block_error_of_a_hand_rollout(n, reduction, models):
    student, teacher = models
    batch = batch_for(teacher, n)
    params = theta(student)
    sb, tb = student.get_submodule(UNIT), teacher.get_submodule(UNIT)
    errors, _ = hand_block_errors(student, teacher, batch, n)
    mean_error = torch.stack(errors).mean(0)
    ref = state_loss(mean_error, torch.zeros_like(mean_error), reduction)
    ref.backward()
    want = grads(params)
    loss = accumulated(student, teacher, batch, reduction)
    got = grads(params)
    assert want.norm() > 0
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.norm()))
    if n == 1:  # one step: the per-step objective
        torch.testing.assert_close(loss, per_step_loss(student, teacher, sb, tb, ddim(), batch, None, reduction).detach(),
                                   rtol=1e-6, atol=0)
        zero(params)
    else:  # the mean of the errors, not the mean of their squares (block_output's loss)
        with torch.no_grad():
            squares = torch.stack([state_loss(e, torch.zeros_like(e), reduction) for e in errors]).mean()
        assert float(loss) < float(squares) * (1 - 1e-4)


def saved_tensor_peaks(objective, student: nn.Module, teacher: nn.Module) -> dict[int, int]:
    """Peak bytes of the tensors saved for backward while ``objective`` runs n = 1 and n = 4 steps on 16 items;
    none may outlive the call."""
    peaks = {}
    for n in (1, 4):
        batch = batch_for(teacher, n, size=16)
        with SavedTensorBytes() as probe:
            objective(student, teacher, batch)
        assert probe.live == 0
        peaks[n] = probe.peak
        zero(theta(student))
    return peaks


def test_accumulated_holds_one_steps_graph_at_a_time(models):
    peaks = saved_tensor_peaks(accumulated, *models)
    assert peaks[1] > 0 and peaks[4] <= 1.05 * peaks[1]


@pytest.mark.parametrize("n", [1, 3])
def test_an_unquantized_student_stays_on_the_fp_trajectory_with_zero_loss(n, models):
    _, teacher = models
    student = copy.deepcopy(teacher).requires_grad_(True)  # the FP model as its own (trainable) student
    loss = step(student, teacher, batch_for(teacher, n))
    assert float(loss) < 1e-12


def test_one_steps_graph_at_a_time(models):
    peaks = saved_tensor_peaks(step, *models)
    assert peaks[4] <= 1.1 * peaks[1], peaks


def test_run_capturing_returns_the_forward_result_and_keeps_only_the_blocks_graph(models):
    student, _ = models
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(500)
    with torch.no_grad():
        want = student(x, t).sample
    out, captured = run_capturing(student.get_submodule(UNIT), lambda: student(x, t).sample)
    torch.testing.assert_close(out, want)
    assert captured.requires_grad and not out.requires_grad  # the layers after the block hold no graph


def test_block_output_target_needs_the_stepwise_gradient_and_a_known_name():
    with pytest.raises(ValueError, match="--model.init_args.gradient 'checkpointed'.*gradient 'stepwise'"):
        BlockReconstruction(objective="accuquant", rollout_target="block_output", gradient="checkpointed")
    with pytest.raises(ValueError, match="--model.init_args.rollout_target: unknown value 'blocks'"):
        BlockReconstruction(rollout_target="blocks")
    BlockReconstruction(objective="accuquant", rollout_target="block_output", gradient="stepwise")


def test_defaults_are_the_measured_best_variant():
    default = BlockReconstruction()
    assert (default.settings.rollout_target, default.settings.gradient) == ("block_output", "stepwise")
    assert BlockReconstruction(rollout_target="state").settings.gradient == "approx"
    assert BlockReconstruction(rollout_target="state", gradient="exact").settings.gradient == "exact"


# ----------------------------------------------------------- state loss + per-step block term (block_loss_weight)
def test_group_block_loss_is_the_per_step_objective_on_each_fp_state(models):
    student, teacher = models
    batch = batch_for(teacher, 3)
    params = theta(student)
    sb, tb = student.get_submodule(UNIT), teacher.get_submodule(UNIT)
    states = [batch["x"], *batch["targets"].transpose(0, 1)[:-1]]
    ref = torch.zeros(())
    for j, s in enumerate(states):
        item = {"x": s, "timesteps": batch["timesteps"][:, j:]}
        loss_j = per_step_loss(student, teacher, sb, tb, ddim(), item, None, "mean") / 3
        loss_j.backward()
        ref = ref + loss_j.detach()
    want = grads(params)
    loss = group_block_loss(student, teacher, sb, tb, ddim(), batch, None, "mean", scale=2.0)
    got = grads(params)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, 2.0 * want, rtol=1e-5, atol=1e-7 * float(want.norm()))


@pytest.mark.parametrize(("state_w", "block_w"), [(0.0, 1.0), (10.0, 1.0)])
def test_weighted_terms_calibrate_through_the_cli_and_log_each_term(tmp_path, tiny_model_dir, state_w, block_w):
    cli = main(tiny_args(tmp_path, tiny_model_dir, rollout_target="state", gradient="checkpointed",
                         ablations={"state_loss_weight": state_w, "block_loss_weight": block_w}))
    assert cli.model.done_units == cli.model.unit_names
    logged = cli.trainer.logged_metrics
    assert ("calib/state_loss" in logged) == (state_w > 0) and "calib/block_loss" in logged
    want = state_w * logged.get("calib/state_loss", torch.tensor(0.0)) + block_w * logged["calib/block_loss"]
    torch.testing.assert_close(logged["calib/loss"], want)


def test_loss_weights_reject_bad_values():
    with pytest.raises(ValueError, match=r"--model.init_args.ablations.block_loss_weight must be >= 0, got -1"):
        BlockReconstruction(ablations=Ablations(block_loss_weight=-1.0))
    with pytest.raises(ValueError, match="both 0"):
        BlockReconstruction(rollout_target="state", ablations=Ablations(state_loss_weight=0.0, block_loss_weight=0.0))
    with pytest.raises(ValueError, match="with 'block_output' leave them"):
        BlockReconstruction(rollout_target="block_output", gradient="stepwise", ablations=Ablations(block_loss_weight=1.0))
