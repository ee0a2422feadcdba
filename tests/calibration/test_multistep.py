"""The AccuQuant rollout on multistep and other diffusers samplers (calibration/rollout.py, diffusion/schedulers.py).

A group that starts at schedule step k must meet the sampler in the state it has there. The FP trajectory cache
is built with ``sampling.sample`` (the sampler every other part of the project uses); the rollout's scheduler
is primed at k from the cached FP states and model outputs of earlier steps.

Tolerances: with the FP model as the student, the primed n-step rollout reproduces the cached FP states
x_{k+1}..x_{k+n} bitwise at every start k for every scheduler below (measured max |error| = 0, asserted with
``assert_close(rtol=1e-6, atol=1e-6)``); the same rollout without priming misses them by 0.3..1.9 (DPM-Solver++,
UniPC) and 1e4 (PNDM) on states of magnitude ~500. Gradients against a hand-rolled sampler: as in
test_rollout.py, ||got - ref|| <= 1e-4 ||ref||.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from torch import Tensor, nn
from torch.utils.data import default_collate

from accuquant_pl.calibration.objectives import accuquant_step, check_rollout_scheduler
from accuquant_pl.calibration.rollout import GroupSteps, group_steps, rollout, simulate
from accuquant_pl.data.groups import TrajectoryGroups
from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.diffusion.noise import is_stochastic
from accuquant_pl.diffusion.sampling import initial_noise, model_output, sample
from accuquant_pl.diffusion.schedulers import SCHEDULERS, history_steps, prime
from benchmarks.memory import LiveTensorBytes
from tests.calibration.gradients import flat_grad, theta, zero
from tests.conftest import tiny_unet

STEPS = 10
BATCH = 3
MODES = ("exact", "checkpointed", "approx", "stepwise")
# (name in SCHEDULERS, config overrides): DDIM as the one-step reference, the multistep solvers, Euler (position only)
CASES = {
    "ddim": ("ddim", {}),
    "dpmsolver++": ("dpmsolver++", {}),  # solver_order 2, the diffusers default
    "dpmsolver++3": ("dpmsolver++", {"solver_order": 3}),
    "unipc": ("unipc", {}),
    "unipc3": ("unipc", {"solver_order": 3}),
    "pndm": ("pndm", {}),  # with its Runge-Kutta warm-up steps (duplicate timesteps)
    "euler": ("euler", {}),
}
MULTISTEP = ("dpmsolver++", "dpmsolver++3", "unipc", "unipc3", "pndm")


def make_scheduler(case: str):
    name, overrides = CASES[case]
    sched = SCHEDULERS[name].from_config(DDPMScheduler(num_train_timesteps=1000).config, **overrides)
    sched.set_timesteps(STEPS)
    return sched


def fp_teacher() -> nn.Module:
    return tiny_unet(seed=1).eval().requires_grad_(False)


def cache(case: str, teacher: nn.Module) -> dict[str, Tensor]:
    """The trajectory cache's tensors, as TrajectoryDataModule stores them (B first)."""
    traj = sample(teacher, make_scheduler(case), initial_noise(list(range(BATCH)), (1, 8, 8)), STEPS,
                  keep_trajectory=True, keep_model_outputs=True)
    return {"states": traj.states.transpose(0, 1), "model_outputs": traj.model_outputs.transpose(0, 1),
            "timesteps": traj.timesteps}


def batch_at(groups: TrajectoryGroups, start: int) -> dict:
    """All trajectories' items at one group start, collated as the DataLoader does."""
    return default_collate([groups[groups.index.index((i, start))] for i in range(BATCH)])


def network_of(unet: nn.Module, steps: GroupSteps):
    return lambda j, x: model_output(unet, steps.scale(j, x), steps.timesteps[j])


def unprimed_rollout(unet: nn.Module, case: str, x: Tensor, start: int, n: int) -> Tensor:
    """What a rollout does with a fresh scheduler merely positioned at the start (no history)."""
    sched = make_scheduler(case)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    with torch.no_grad():
        for j in range(n):
            t = sched.timesteps[start + j]
            x = sched.step(model_output(unet, sched.scale_model_input(x, t), t), t, x).prev_sample
    return x


# ----------------------------------------------------------------------------- the FP model reproduces its cache


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_primed_fp_rollout_reproduces_the_cached_trajectory_at_every_start(case, n):
    teacher = fp_teacher()
    tensors = cache(case, teacher)
    sched = make_scheduler(case)
    groups = TrajectoryGroups(tensors, n, "all", history=history_steps(sched))
    num_steps = len(tensors["timesteps"])
    assert groups.starts == list(range(num_steps - n + 1))
    misses = []
    for k in groups.starts:
        batch = batch_at(groups, k)
        steps = group_steps(sched, batch)
        states, _ = simulate(network_of(teacher, steps), steps, batch["x"], n)
        torch.testing.assert_close(torch.stack(states[1:], 1), batch["targets"], rtol=1e-6, atol=1e-6)
        if case in MULTISTEP and 1 <= k <= num_steps - 2:
            misses.append((unprimed_rollout(teacher, case, batch["x"], k, n) - batch["target"]).abs().max().item())
    # The test can tell: without the history, the same rollout misses the FP state at every inner start.
    if misses:
        assert min(misses) > 1e-3, misses


def test_dpmsolver_window_equals_a_full_replay():
    """history_steps: solver_order - 1 FP steps prime DPM-Solver++ as well as the whole prefix does."""
    teacher = fp_teacher()
    for case in ("dpmsolver++", "dpmsolver++3"):
        tensors = cache(case, teacher)
        sched = make_scheduler(case)
        assert history_steps(sched) == sched.config.solver_order - 1
        full = TrajectoryGroups(tensors, 2, "all", history=STEPS)
        short = TrajectoryGroups(tensors, 2, "all", history=history_steps(sched))
        for k in full.starts:
            a, b = batch_at(full, k), batch_at(short, k)
            assert b["history_outputs"].shape[1] == min(k, sched.config.solver_order - 1)
            out = [simulate(network_of(teacher, s), s, a["x"], 2)[0][-1] for s in (group_steps(sched, a),
                                                                                 group_steps(sched, b))]
            assert torch.equal(out[0], out[1])


def test_history_windows():
    assert history_steps(make_scheduler("ddim")) == 0
    assert history_steps(make_scheduler("euler")) == 0
    assert history_steps(make_scheduler("dpmsolver++")) == 1
    assert history_steps(make_scheduler("unipc")) == STEPS  # the corrector chains the previous sample
    pndm = make_scheduler("pndm")
    assert history_steps(pndm) == len(pndm.timesteps) > STEPS


def test_accuquant_step_with_the_fp_student_has_zero_loss_in_every_mode():
    teacher = fp_teacher()
    student = tiny_unet(seed=1).eval()  # same weights, trainable
    for case in ("dpmsolver++", "unipc"):
        tensors = cache(case, teacher)
        sched = make_scheduler(case)
        groups = TrajectoryGroups(tensors, 3, "all", history=history_steps(sched))
        for mode in MODES:
            loss = accuquant_step(student, sched, batch_at(groups, 4), None, mode, "mean")
            assert loss.item() <= 1e-12, (case, mode, loss.item())
        # the template scheduler is never stepped
        assert getattr(sched, "step_index", None) is None


# -------------------------------------------------------------------- gradients against a hand-rolled sampler

START, N = 3, 3


def assert_grads_close(got: Tensor, ref: Tensor, rtol: float = 1e-4) -> None:
    norm = ref.norm().item()
    assert norm > 0
    rel = ((got - ref).norm() / norm).item()
    assert rel <= rtol, f"relative gradient error {rel:.3g} > {rtol}"


class Setup:
    """A float student (seed 0) against the FP teacher's trajectories (seed 1) under one scheduler."""

    def __init__(self, case: str):
        self.case, self.teacher, self.student = case, fp_teacher(), tiny_unet(seed=0).eval()
        self.tensors = cache(case, self.teacher)
        self.sched = make_scheduler(case)
        groups = TrajectoryGroups(self.tensors, N, "all", history=history_steps(self.sched))
        self.batch = batch_at(groups, START)
        self.targets = self.batch["targets"].transpose(0, 1)

    def steps(self) -> GroupSteps:
        return group_steps(self.sched, self.batch)

    def hybrid_sampler_loss(self) -> Tensor:
        """The sampler itself, run from the initial noise with the FP teacher for START steps and the student for
        N more (graph through the student's steps): the reference the primed rollout must equal."""
        sched = make_scheduler(self.case)
        x = self.tensors["states"][:, 0]
        for idx in range(START + N):
            t = sched.timesteps[idx]
            model = self.teacher if idx < START else self.student
            with torch.set_grad_enabled(idx >= START):
                x = sched.step(model_output(model, sched.scale_model_input(x, t), t), t, x).prev_sample
            if idx == START - 1:
                assert torch.equal(x, self.batch["x"])  # the cache is the sampler's trajectory
        return (x - self.targets[-1]).pow(2).mean()


@pytest.mark.parametrize("case", ["dpmsolver++", "unipc", "pndm"])
def test_exact_and_checkpointed_equal_the_hand_rolled_sampler(case):
    s = Setup(case)
    params = theta(s.student)
    zero(params)
    ref_loss = s.hybrid_sampler_loss()
    ref_loss.backward()
    ref = flat_grad(params)
    steps = s.steps()
    for mode in ("exact", "checkpointed"):
        zero(params)
        loss = rollout(mode, network_of(s.student, steps), steps, s.batch["x"], s.targets)
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=0)
        assert_grads_close(flat_grad(params), ref)


@pytest.mark.parametrize("case", ["dpmsolver++", "unipc"])
def test_approx_and_stepwise_keep_their_definitions_on_a_multistep_sampler(case):
    s = Setup(case)
    params = theta(s.student)
    steps = s.steps()
    net = network_of(s.student, steps)
    # approx = exact with the network input detached (the sampler's own dependence, history included, kept)
    zero(params)
    rollout("exact", lambda j, x: net(j, x.detach()), steps, s.batch["x"], s.targets)
    ref = flat_grad(params)
    zero(params)
    approx_loss = rollout("approx", net, steps, s.batch["x"], s.targets)
    approx = flat_grad(params)
    assert_grads_close(approx, ref)
    # its graphs kept rather than recomputed: the same, bit for bit, history included
    zero(params)
    kept_loss = rollout("approx", net, steps, s.batch["x"], s.targets, recompute=False)
    assert torch.equal(kept_loss, approx_loss) and torch.equal(flat_grad(params), approx)
    # ... and it differs from exact (the output depends on x)
    zero(params)
    rollout("exact", net, steps, s.batch["x"], s.targets)
    exact = flat_grad(params)
    assert ((exact - ref).norm() / exact.norm()).item() > 1e-3
    # stepwise: per-step losses from the detached states, each step reading the detached earlier ones
    zero(params)
    xs, outs = simulate(net, steps, s.batch["x"], N)
    losses = [(steps(j, xs[j], net(j, xs[j]), tuple(xs[:j]), tuple(outs[:j])) - s.targets[j]).pow(2).mean()
              for j in range(N)]
    torch.stack(losses).sum().backward()
    ref = flat_grad(params)
    zero(params)
    total = rollout("stepwise", net, steps, s.batch["x"], s.targets)
    torch.testing.assert_close(total, torch.stack(losses).sum().detach(), rtol=1e-6, atol=0)
    assert_grads_close(flat_grad(params), ref)


def test_n1_all_modes_agree_on_a_multistep_sampler():
    s = Setup("unipc")
    groups = TrajectoryGroups(s.tensors, 1, "all", history=history_steps(s.sched))
    batch = batch_at(groups, START)
    params = theta(s.student)
    grads = {}
    for mode in MODES:
        zero(params)
        accuquant_step(s.student, s.sched, batch, None, mode, "mean")
        grads[mode] = flat_grad(params)
    for mode in MODES[1:]:
        assert_grads_close(grads[mode], grads["exact"])


def test_checkpointed_and_approx_memory_do_not_grow_with_n_on_unipc():
    teacher = fp_teacher()
    student = tiny_unet(seed=0).eval()
    sched = make_scheduler("unipc")
    traj = sample(teacher, make_scheduler("unipc"), initial_noise(list(range(16)), (1, 8, 8)), STEPS,
                  keep_trajectory=True, keep_model_outputs=True)
    x = traj.states[2]
    live = {}
    for n in (1, 4):
        steps = GroupSteps(sched, 2, n, traj.states[:2], traj.model_outputs[:2])
        targets = traj.states[3 : 3 + n]
        for mode in MODES:
            zero(theta(student))
            with LiveTensorBytes() as m:
                rollout(mode, network_of(student, steps), steps, x, targets)
            live[mode, n] = m.peak
    assert live["exact", 4] >= 3 * live["exact", 1], live
    for mode in ("checkpointed", "approx", "stepwise"):
        assert live[mode, 4] <= 1.5 * live[mode, 1], (mode, live)


# --------------------------------------------------------------------------------- data module and samplers


@pytest.mark.parametrize("scheduler, expected", [("ddim", None), ("dpmsolver++", 1), ("unipc", "all")])
def test_data_module_items_carry_the_history_the_sampler_needs(tiny_model_dir, tmp_path, scheduler, expected):
    dm = TrajectoryDataModule(pretrained=str(tiny_model_dir), scheduler=scheduler, num_inference_steps=5,
                              num_trajectories=4, batch_size=2, group_size=2, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    for k in dm.train_set.starts:
        item = dm.train_set[dm.train_set.index.index((1, k))]
        if expected is None:
            assert "history_states" not in item
            continue
        h = min(k, 1) if expected == 1 else k
        assert item["history_states"].shape == (h, 1, 8, 8) == item["history_outputs"].shape
        assert torch.equal(item["history_states"], dm.tensors["states"][1, k - h : k])
        assert torch.equal(item["history_outputs"], dm.tensors["model_outputs"][1, k - h : k])
    batch = next(iter(dm.train_dataloader()))
    assert bool((batch["step_index"] == batch["step_index"][0]).all())


def test_a_multistep_batch_without_history_is_an_error_not_an_unprimed_rollout():
    s = Setup("dpmsolver++")
    batch = {k: v for k, v in s.batch.items() if not k.startswith("history")}
    with pytest.raises(ValueError, match=r"needs the FP states and model outputs of the 1 steps before group start 3"):
        accuquant_step(s.student, s.sched, batch, None, "exact", "mean")
    assert all(p.grad is None for p in s.student.parameters())
    # a one-step sampler needs none
    ddim = Setup("ddim")
    batch = {k: v for k, v in ddim.batch.items() if not k.startswith("history")}
    accuquant_step(ddim.student, ddim.sched, batch, None, "exact", "mean")


def test_prime_leaves_the_template_alone_and_positions_the_copy():
    s = Setup("dpmsolver++")
    fresh = make_scheduler("dpmsolver++")
    steps = s.steps()
    assert steps.base.step_index == START and fresh.step_index is None and s.sched.step_index is None
    primed = prime(make_scheduler("dpmsolver++"), START, s.tensors["states"][:, :START].transpose(0, 1),
                   s.tensors["model_outputs"][:, :START].transpose(0, 1))
    assert primed.step_index == START


@pytest.mark.parametrize("case, eta", [("ddim", 0.0), ("dpmsolver++", 0.0), ("unipc", 0.0), ("pndm", 0.0),
                                       ("euler", 0.0)])
def test_deterministic_samplers_are_accepted(case, eta):
    sched = make_scheduler(case)
    assert not is_stochastic(sched, eta)
    check_rollout_scheduler(sched, eta, serves_step_noise=False)
    assert getattr(sched, "step_index", None) is None  # the probe works on copies


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "unipc"])
def test_tiny_accuquant_calibration_with_a_multistep_sampler_through_the_cli(tmp_path, tiny_model_dir, scheduler):
    from accuquant_pl.cli import main
    from accuquant_pl.deploy import load_quantized
    from tests.calibration.test_calibration_cli import tiny_args

    args = [*tiny_args(tmp_path, tiny_model_dir, rollout_target="state", gradient="checkpointed"), "--data.init_args.scheduler", scheduler,
            "--data.init_args.group_size", "3"]
    cli = main(args)
    module = cli.model
    assert len(module.done_units) == len(module.unit_names)
    dm = cli.datamodule
    assert type(dm.make_scheduler()).__name__ == type(make_scheduler(scheduler)).__name__
    assert dm.train_set.history == history_steps(dm.make_scheduler()) > 0
    loss = cli.trainer.callback_metrics["calib/loss"]
    assert torch.isfinite(loss) and loss > 0
    unet = load_quantized(tmp_path / "run" / "quantized")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(unet(x, 10).sample, module.student(x, 10).sample)
