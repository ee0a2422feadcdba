"""The teachers' shared TrainingSchedule: one group sets both teachers' DDPM process and optimiser, bad values
are named by their config key."""

from __future__ import annotations

import pytest
import torch

from accuquant_pl.diffusion.pretraining import DiffusionPretraining, DiTPretraining, TrainingSchedule


def test_the_schedule_sets_the_noise_process_and_the_optimiser():
    schedule = TrainingSchedule(learning_rate=5e-4, weight_decay=0.01, num_train_timesteps=50, beta_schedule="linear")
    module = DiTPretraining(sample_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                            training=schedule)
    assert module.noise_scheduler.config.num_train_timesteps == 50
    assert module.noise_scheduler.config.beta_schedule == "linear"

    class Trainer:  # configure_optimizers reads only the run length
        estimated_stepping_batches = 10

    module._trainer = Trainer()
    opt = module.configure_optimizers()["optimizer"]
    assert opt.param_groups[0]["weight_decay"] == 0.01
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(5e-4)
    # each teacher keeps its own default learning rate (the UNet's 2e-3 was measured on the digits)
    assert DiffusionPretraining(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).schedule.learning_rate == 2e-3
    assert DiTPretraining(sample_size=8, num_layers=1, num_attention_heads=2,
                          attention_head_dim=8).schedule.learning_rate == 1e-3


def test_the_validation_loss_uses_the_schedules_seed():
    def val_loss(seed: int) -> float:
        torch.manual_seed(0)
        module = DiTPretraining(sample_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                                training=TrainingSchedule(val_seed=seed))
        logged = {}
        module.log = lambda name, value, **kw: logged.setdefault(name, float(value.detach()))
        module.validation_step((torch.zeros(2, 1, 8, 8), torch.tensor([1, 2])), 0)
        return logged["val/loss"]

    assert val_loss(1) == val_loss(1) != val_loss(2)


@pytest.mark.parametrize("field, value", [("learning_rate", 0.0), ("warmup_steps", -1), ("num_train_timesteps", 1)])
def test_bad_values_name_their_key(field, value):
    with pytest.raises(ValueError, match=rf"--model.init_args.training.*{value}"):
        TrainingSchedule(**{field: value})
