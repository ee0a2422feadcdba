"""The AccuQuant rollout on stochastic samplers (diffusion/noise.py): DDIM with eta > 0, DDPM, Euler ancestral and
SDE-DPM-Solver++ (a multistep sampler that also draws noise).

The FP trajectory cache records each trajectory's seed; step k of trajectory i draws its noise from a generator
seeded from (seed_i, k). With the FP model as the student, the rollout from any cached state reproduces the
cached states bit for bit (torch.equal), while the same rollout without the trajectories' noise misses them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn
from torch.utils.data import default_collate

from accuquant_pl.calibration.objectives import (
    accuquant_block_accumulated_step,
    accuquant_block_step,
    accuquant_step,
    check_rollout_scheduler,
)
from accuquant_pl.calibration.rollout import GroupSteps, group_steps, rollout, simulate
from accuquant_pl.data.groups import TrajectoryGroups
from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.diffusion import schedulers as schedulers_module
from accuquant_pl.diffusion.noise import is_stochastic, noise_is_replayable, step_generators, step_noise_seed
from accuquant_pl.diffusion.sampling import initial_noise, model_output, sample
from accuquant_pl.diffusion.schedulers import history_steps, scheduler_from_config
from tests.calibration.gradients import flat_grad, theta, zero
from tests.conftest import tiny_unet

STEPS = 8
SEEDS = [5, 6, 7]
MODES = ("exact", "checkpointed", "approx", "stepwise")
# name -> (scheduler name as a config gives it, eta)
CASES = {
    "ddim-eta1": ("ddim", 1.0),
    "ddim-eta0.5": ("ddim", 0.5),
    "ddpm": ("ddpm", 0.0),
    "euler-ancestral": ("euler-ancestral", 0.0),
    "sde-dpmsolver++": ("sde-dpmsolver++", 0.0),
    "lcm (import path)": ("diffusers.LCMScheduler", 0.0),  # any scheduler class, by import path
}


def make_scheduler(case: str):
    sched = scheduler_from_config(CASES[case][0], DDPMScheduler(num_train_timesteps=1000).config)
    sched.set_timesteps(STEPS)
    return sched


def fp_teacher() -> nn.Module:
    return tiny_unet(seed=1).eval().requires_grad_(False)


def cache(case: str, teacher: nn.Module, seeds: list[int] = SEEDS) -> dict[str, Tensor]:
    """The trajectory cache's tensors, as TrajectoryDataModule stores them for a stochastic sampler."""
    traj = sample(teacher, make_scheduler(case), initial_noise(seeds, (1, 8, 8)), STEPS, eta=CASES[case][1],
                  keep_trajectory=True, keep_model_outputs=True, noise_seeds=seeds)
    return {"states": traj.states.transpose(0, 1), "model_outputs": traj.model_outputs.transpose(0, 1),
            "timesteps": traj.timesteps, "noise_seeds": torch.tensor(seeds)}


def groups_of(case: str, tensors: dict[str, Tensor], n: int) -> TrajectoryGroups:
    return TrajectoryGroups(tensors, n, "all", history=history_steps(make_scheduler(case)), eta=CASES[case][1])


def batch_at(groups: TrajectoryGroups, start: int) -> dict:
    """All trajectories' items at one group start, in the order they were sampled (the same forward batch)."""
    return default_collate([groups[groups.index.index((i, start))] for i in range(len(SEEDS))])


def network_of(unet: nn.Module, steps: GroupSteps):
    return lambda j, x: model_output(unet, steps.scale(j, x), steps.timesteps[j])


def test_the_samplers_draw_noise_and_every_draw_comes_from_the_given_generators():
    for case, (_, eta) in CASES.items():
        sched = make_scheduler(case)
        assert is_stochastic(sched, eta), case
        assert noise_is_replayable(sched, eta), case
        check_rollout_scheduler(sched, eta, serves_step_noise=True)


def test_step_noise_depends_on_the_seed_and_step_only():
    assert step_noise_seed(3, 4) == step_noise_seed(3, 4)
    seeds = {step_noise_seed(s, k) for s in range(20) for k in range(20)}
    assert len(seeds) == 400  # no (seed, step) shares a neighbour's noise
    a = torch.randn(4, generator=step_generators([3], 4)[0])
    b = torch.randn(4, generator=step_generators([9, 3], 4)[1])
    assert torch.equal(a, b)
    teacher = fp_teacher()
    forward = cache("ddim-eta1", teacher, [5, 6, 7])["states"]
    backward = cache("ddim-eta1", teacher, [7, 6, 5])["states"]
    # the same trajectory in another batch position: the same noise (float rounding of the network aside)
    torch.testing.assert_close(forward, backward.flip(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_fp_rollout_reproduces_the_stochastic_trajectory_bit_for_bit(case, n):
    teacher = fp_teacher()
    tensors = cache(case, teacher)
    groups = groups_of(case, tensors, n)
    sched = make_scheduler(case)
    for k in groups.starts:
        batch = batch_at(groups, k)
        assert batch["noise_seed"].tolist() == SEEDS
        steps = group_steps(sched, batch)
        states, _ = simulate(network_of(teacher, steps), steps, batch["x"], n)
        assert torch.equal(torch.stack(states[1:], 1), batch["targets"]), (case, k)
        # the test can tell: the same rollout with other noise misses the FP states
        if k < STEPS - 1:  # the samplers add no noise at their last step (to t = 0)
            blind = {key: v for key, v in batch.items() if key not in ("noise_seed", "eta")}
            other = GroupSteps(sched, k, n, steps_history(blind, "history_states"),
                                 steps_history(blind, "history_outputs"), eta=CASES[case][1],
                                 noise_seeds=[s + 100 for s in SEEDS])
            missed, _ = simulate(network_of(teacher, other), other, batch["x"], n)
            assert (missed[-1] - batch["target"]).abs().max() > 1e-3, (case, k)
    assert getattr(sched, "step_index", None) is None  # the template is never stepped


def steps_history(batch: dict, key: str) -> Tensor | None:
    value = batch.get(key)
    return None if value is None else value.transpose(0, 1)


@pytest.mark.parametrize("case", ["ddim-eta1", "ddpm", "sde-dpmsolver++"])
def test_every_gradient_mode_has_zero_loss_with_the_fp_student(case):
    teacher = fp_teacher()
    student = tiny_unet(seed=1).eval()  # same weights, trainable
    batch = batch_at(groups_of(case, cache(case, teacher), 3), 2)
    for mode in MODES:
        loss = accuquant_step(student, make_scheduler(case), batch, None, mode, "mean")
        assert loss.item() == 0.0, (case, mode, loss.item())


@pytest.mark.parametrize("target", ["block_output", "block_accumulated"])
@pytest.mark.parametrize("case", ["ddim-eta1", "ddpm"])
def test_block_targets_follow_the_stochastic_trajectory_with_the_fp_student(case, target):
    # The FP student's rollout meets the cached FP states only under the trajectories' own step noise: the block's
    # outputs there equal the FP block's on the cached states (zero loss), and without that noise they do not.
    teacher = fp_teacher()
    student = tiny_unet(seed=1).eval()  # same weights, trainable
    unit = "down_blocks.1"
    step_fn = accuquant_block_step if target == "block_output" else accuquant_block_accumulated_step
    batch = batch_at(groups_of(case, cache(case, teacher), 3), 2)

    def loss(items: dict) -> float:
        return step_fn(student, teacher, student.get_submodule(unit), teacher.get_submodule(unit),
                       make_scheduler(case), items, None, "mean").item()

    assert loss(batch) == 0.0
    other = {**batch, "noise_seed": batch["noise_seed"] + 100}
    assert loss(other) > 1e-8


def hybrid_sampler_loss(case: str, teacher: nn.Module, student: nn.Module, tensors: dict, start: int,
                        n: int) -> Tensor:
    """The sampler itself with each trajectory's step noise: the FP teacher for ``start`` steps, then the student
    for n more (graph through the student's steps); the loss against the FP state after them."""
    sched = make_scheduler(case)
    eta = CASES[case][1]
    x = tensors["states"][:, 0]
    for k in range(start + n):
        t = sched.timesteps[k]
        model = teacher if k < start else student
        extra = {"generator": step_generators(SEEDS, k), **({"eta": eta} if case.startswith("ddim") else {})}
        with torch.set_grad_enabled(k >= start):
            x = sched.step(model_output(model, sched.scale_model_input(x, t), t), t, x, **extra).prev_sample
        if k == start - 1:
            assert torch.equal(x, tensors["states"][:, start])
    return (x - tensors["states"][:, start + n]).pow(2).mean()


@pytest.mark.parametrize("case", ["ddim-eta1", "sde-dpmsolver++"])
def test_exact_and_checkpointed_gradients_equal_the_stochastic_sampler(case):
    start, n = 2, 3
    teacher, student = fp_teacher(), tiny_unet(seed=0).eval()
    tensors = cache(case, teacher)
    params = theta(student)
    zero(params)
    ref_loss = hybrid_sampler_loss(case, teacher, student, tensors, start, n)
    ref_loss.backward()
    ref = flat_grad(params)
    batch = batch_at(groups_of(case, tensors, n), start)
    steps = group_steps(make_scheduler(case), batch)
    for mode in ("exact", "checkpointed"):
        zero(params)
        loss = rollout(mode, network_of(student, steps), steps, batch["x"], batch["targets"].transpose(0, 1))
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=0)
        got = flat_grad(params)
        assert ((got - ref).norm() / ref.norm()).item() <= 1e-4, mode


def test_n1_all_modes_agree_on_a_stochastic_sampler():
    teacher, student = fp_teacher(), tiny_unet(seed=0).eval()
    batch = batch_at(groups_of("ddpm", cache("ddpm", teacher), 1), 3)
    params = theta(student)
    grads = {}
    for mode in MODES:
        zero(params)
        accuquant_step(student, make_scheduler("ddpm"), batch, None, mode, "mean")
        grads[mode] = flat_grad(params)
    for mode in MODES[1:]:
        assert ((grads[mode] - grads["exact"]).norm() / grads["exact"].norm()).item() <= 1e-4, mode


# ------------------------------------------------------------------------------------------------ bad input


class GlobalNoiseDDPM(DDPMScheduler):
    """A custom scheduler whose step draws its noise from the global RNG, ignoring the generator."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        out = super().step(model_output, timestep, sample, generator=None, return_dict=return_dict)
        out.prev_sample.add_(0.01 * torch.randn_like(sample))
        return out


def test_noise_outside_the_generator_is_detected_and_named(tiny_model_dir, tmp_path, monkeypatch):
    sched = GlobalNoiseDDPM(num_train_timesteps=1000)
    sched.set_timesteps(STEPS)
    assert is_stochastic(sched) and not noise_is_replayable(sched)
    with pytest.raises(ValueError, match=r"GlobalNoiseDDPM \(eta=0.0\) draws noise .* does not control"):
        check_rollout_scheduler(sched, 0.0, serves_step_noise=True)
    monkeypatch.setitem(schedulers_module.SCHEDULERS, "global-noise", GlobalNoiseDDPM)
    dm = TrajectoryDataModule(pretrained=str(tiny_model_dir), scheduler="global-noise", num_inference_steps=4,
                              num_trajectories=2, batch_size=2, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="GlobalNoiseDDPM"):
        dm.prepare_data()
    assert not (tmp_path / "cache").exists()


def test_a_stochastic_sampler_without_the_trajectories_noise_is_refused():
    sched = make_scheduler("ddpm")
    with pytest.raises(ValueError, match=r"DDPMScheduler with eta=0.0 draws noise .* does not serve"):
        check_rollout_scheduler(sched, 0.0, serves_step_noise=False)
    check_rollout_scheduler(make_scheduler("ddim-eta1"), 0.0, serves_step_noise=False)  # eta 0: deterministic


# ------------------------------------------------------------------------------------------------ data module


@pytest.mark.parametrize("scheduler, eta", [("ddim", 1.0), ("ddpm", 0.0), ("sde-dpmsolver++", 0.0)])
def test_data_module_records_the_trajectory_seeds_and_items_carry_them(tiny_model_dir, tmp_path, scheduler, eta):
    def module(**kw):
        return TrajectoryDataModule(pretrained=str(tiny_model_dir), scheduler=scheduler, eta=eta, num_inference_steps=5,
                                    num_trajectories=4, seed=10, batch_size=2, group_size=2,
                                    cache_dir=str(tmp_path / "cache"), **kw)

    dm = module(sampling_batch_size=4)
    assert dm.serves_step_noise
    assert dm.cache_key()["step_noise"] == "per-trajectory-step"
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tensors["noise_seeds"].tolist() == [10, 11, 12, 13]
    item = dm.train_set[dm.train_set.index.index((2, 1))]
    assert item["noise_seed"] == 12 and item["eta"] == eta
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["noise_seed"].tolist()) <= {10, 11, 12, 13}
    # the trajectories do not depend on the batch they were sampled in
    other = module(sampling_batch_size=1, cache_path=str(tmp_path / "one_by_one"))
    other.prepare_data()
    other.setup("fit")
    torch.testing.assert_close(other.tensors["states"], dm.tensors["states"], rtol=1e-5, atol=1e-5)


def test_a_deterministic_cache_keeps_its_key_and_items(tiny_model_dir, tmp_path):
    dm = TrajectoryDataModule(pretrained=str(tiny_model_dir), scheduler="ddim", eta=0.0, num_inference_steps=5,
                              num_trajectories=2, batch_size=2, cache_dir=str(tmp_path / "cache"))
    assert not dm.serves_step_noise and "step_noise" not in dm.cache_key()
    dm.prepare_data()
    dm.setup("fit")
    assert "noise_seeds" not in dm.tensors and "noise_seed" not in dm.train_set[0]


# ------------------------------------------------------------------------------------------------ end to end


def test_the_ldm_config_runs_the_lsun_protocol_tiny(tmp_path):
    """configs/ldm_w4a8_accuquant.yaml as shipped (DDIM, 200 steps, eta 1.0) on a tiny latent model: calibrate,
    export, sample."""
    from accuquant_pl.cli import main
    from accuquant_pl.deploy import load_quantized
    from tests.calibration.test_conditional import calibration_args, model_folder, predict

    folder = model_folder("ldm", tmp_path)
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")  # LDM's 1000 training steps
    cli = main(calibration_args(tmp_path, "ldm_w4a8_accuquant.yaml", folder, "run",
                                {"num_inference_steps": 200, "group_size": 2}))
    dm = cli.datamodule
    assert (dm.hparams.scheduler, dm.hparams.num_inference_steps, dm.hparams.eta) == ("ddim", 200, 1.0)
    assert dm.serves_step_noise and dm.tensors["states"].shape[1] == 201
    module = cli.model
    assert len(module.done_units) == len(module.unit_names)
    loss = cli.trainer.callback_metrics["calib/loss"]
    assert torch.isfinite(loss) and loss > 0
    quantized = tmp_path / "run" / "quantized"
    x = torch.randn(2, *dm.tensors["states"].shape[-3:])
    assert torch.equal(load_quantized(quantized)(x, 10).sample, module.student(x, 10).sample)
    images = predict(tmp_path, folder, "q", quantized=str(quantized), eta="1.0")
    assert images.shape == (3, 3, 16, 16) and np.isfinite(images).all()


def test_a_sampler_variant_is_a_name_everywhere_a_scheduler_is_taken():
    config = DDPMScheduler(num_train_timesteps=1000).config
    sde = scheduler_from_config("sde-dpmsolver++", config)
    assert sde.config.algorithm_type == "sde-dpmsolver++"
    assert scheduler_from_config("dpmsolver++", config).config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match=r"unknown scheduler 'sde-dpm'; choose one of .*'sde-dpmsolver\+\+'"):
        scheduler_from_config("sde-dpm", config)
    with pytest.raises(ValueError, match=r"unknown scheduler 'diffusers.NoSuchScheduler': cannot import it"):
        scheduler_from_config("diffusers.NoSuchScheduler", config)
    with pytest.raises(ValueError, match=r"'diffusers.UNet2DModel' is not a diffusers scheduler"):
        scheduler_from_config("diffusers.UNet2DModel", config)
    for bad in (".LCMScheduler", "diffusers..LCMScheduler", "euler ancestral"):
        with pytest.raises(ValueError, match=f"unknown scheduler {bad!r}; choose one of"):
            scheduler_from_config(bad, config)
