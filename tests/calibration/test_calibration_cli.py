"""Calibration end to end through the CLI on a tiny UNet: every objective, resume, and bad input."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file

from accuquant_pl.cli import main
from accuquant_pl.data.batching import sub_batches
from accuquant_pl.deploy import exported_scheduler_config, load_quantized
from tests.conftest import REPO, checkpoint_and_export_callbacks


def tiny_args(tmp_path: Path, model_dir: Path, config: str = "digits_w4a8_accuquant.yaml", name: str = "run",
              checkpoint_every: float | None = 60.0, extra_callbacks: list[dict] | None = None,
              plugins: list[dict] | None = None, **model_args) -> list[str]:
    """``fit`` arguments that run ``config`` on a tiny model, 2 iterations per unit, writing under ``tmp_path/name``;
    ``checkpoint_every``: CalibrationCheckpoint's every_n_seconds; ``plugins`` replace the config's."""
    root = tmp_path / name
    override = {
        "trainer": {
            "default_root_dir": str(root), "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root), "name": "tb"}},
            "callbacks": [*checkpoint_and_export_callbacks(root, checkpoint_every), *(extra_callbacks or [])],
            **({"plugins": plugins} if plugins is not None else {}),
        },
        # The main config's final stage is off unless a test asks for it (tests/test_configs.py runs it); RTN
        # takes no iterations.
        "model": {"init_args": {"pretrained": str(model_dir), "act_calibration_samples": 8,
                                **({} if "rtn" in config else {"iterations_per_unit": 2, "final_stage": None}),
                                **model_args}},
        "data": {"init_args": {"num_inference_steps": 6, "num_trajectories": 4, "batch_size": 4,
                               "cache_dir": str(tmp_path / "cache")}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return ["fit", "--config", str(REPO / "configs" / config), "--config", str(path)]


@pytest.mark.parametrize("config", ["digits_w4a8_accuquant.yaml", "digits_w4a8_qdiff.yaml", "digits_w4a8_rtn.yaml"])
def test_tiny_calibration_exports_a_loadable_quantized_model(tmp_path, tiny_model_dir, config):
    cli = main(tiny_args(tmp_path, tiny_model_dir, config))
    module = cli.model
    expected = 0 if "rtn" in config else len(module.unit_names)
    assert len(module.done_units) == expected
    folder = tmp_path / "run" / "quantized"
    unet, scheduler_config = load_quantized(folder), exported_scheduler_config(folder)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(unet(x, 10).sample, module.student(x, 10).sample)
    assert scheduler_config["num_train_timesteps"] == 100
    events = list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard log"


def test_kill_and_resume_gives_identical_weights(tmp_path, tiny_model_dir):
    full = main(tiny_args(tmp_path, tiny_model_dir, name="full"))
    num_units = len(full.model.unit_names)
    stop_after = 3
    main([*tiny_args(tmp_path, tiny_model_dir, name="resumed"), "--trainer.max_epochs", str(stop_after)])
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert len(ckpt["accuquant"]["done_units"]) == stop_after
    resumed = main([*tiny_args(tmp_path, tiny_model_dir, name="resumed"),
                    "--ckpt_path", str(tmp_path / "resumed" / "checkpoints" / "last.ckpt")])
    assert len(resumed.model.done_units) == num_units
    a = load_file(tmp_path / "full" / "quantized" / "quantized.safetensors")
    b = load_file(tmp_path / "resumed" / "quantized" / "quantized.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different[:5]}"


def test_zero_iterations_is_rejected(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="iterations_per_unit must be >= 1"):
        main(tiny_args(tmp_path, tiny_model_dir, iterations_per_unit=0))


def test_unknown_gradient_mode_is_named(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(tiny_args(tmp_path, tiny_model_dir, gradient="fancy"))
    assert "fancy" in capsys.readouterr().err


def test_unknown_objective_is_named(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(tiny_args(tmp_path, tiny_model_dir, objective="magic"))
    assert "magic" in capsys.readouterr().err


def test_a_stochastic_sampler_calibrates_with_mixed_start_batches(tmp_path, tiny_model_dir):
    """DDIM eta = 1: the items carry their trajectory's noise seed through sub-batches of several starts, the
    units and the whole-model final stage."""
    args = [*tiny_args(tmp_path, tiny_model_dir), "--data.init_args.eta", "1.0",
            "--data.init_args.starts_per_batch", "2", "--model.init_args.final_stage.iterations", "2"]
    cli = main(args)
    assert cli.model.final_stage_done
    assert cli.datamodule.serves_step_noise
    batch = next(iter(cli.datamodule.train_dataloader()))
    for part in sub_batches(batch):
        assert part["noise_seed"].shape == part["step_index"].shape and bool((part["eta"] == 1.0).all())
    assert len(cli.model.done_units) == len(cli.model.unit_names)
    assert torch.isfinite(cli.trainer.callback_metrics["calib/loss"])


class RecordStarts(L.Callback):
    """Records the group starts of every training batch's sub-batches (used by the CLI through class_path)."""

    def __init__(self) -> None:
        self.starts: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append([int(part["step_index"][0]) for part in sub_batches(batch)])


@pytest.mark.parametrize("config", ["digits_w4a8_accuquant.yaml", "digits_w4a8_qdiff.yaml"])
def test_mixed_start_batches_calibrate_every_unit(tmp_path, tiny_model_dir, config):
    args = [*tiny_args(tmp_path, tiny_model_dir, config), "--data.init_args.starts_per_batch", "2",
            "--trainer.callbacks+=tests.calibration.test_calibration_cli.RecordStarts"]
    cli = main(args)
    module = cli.model
    assert len(module.done_units) == len(module.unit_names)
    # jsonargparse imports the callback's module by name, which may be another module object than this one
    record = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RecordStarts")
    assert len(record.starts) == 2 * len(module.unit_names)
    assert all(len(starts) == 2 and starts[0] != starts[1] for starts in record.starts)


def test_timestep_grouped_ranges_are_learned_by_every_objective_and_exported(tmp_path, tiny_model_dir):
    """Six DDIM steps over 100 training timesteps: boundaries 40 and 70 put two steps in each of three groups."""
    boundaries = ["--model.init_args.quant.act_timestep_boundaries", "[40, 70]"]
    scales = {}
    for config in ("digits_w4a8_rtn.yaml", "digits_w4a8_qdiff.yaml", "digits_w4a8_accuquant.yaml"):
        name = config.removesuffix(".yaml")
        cli = main([*tiny_args(tmp_path, tiny_model_dir, config, name=name), *boundaries])
        folder = tmp_path / name / "quantized"
        unet = load_quantized(folder)
        x = torch.randn(2, 1, 8, 8)
        for t in (10, 50, 90):
            assert torch.equal(unet(x, t).sample, cli.model.student(x, t).sample)
        tensors = load_file(folder / "quantized.safetensors")
        scales[name] = {k: v for k, v in tensors.items() if k.endswith("quantizer.scale") and v.dim() >= 1}
        assert scales[name] and all(v.shape[0] == 3 for v in scales[name].values())
    init = scales["digits_w4a8_rtn"]  # round-to-nearest keeps the per-group initial step sizes
    for learned in ("digits_w4a8_qdiff", "digits_w4a8_accuquant"):
        for g in range(3):
            assert any(not torch.equal(v[g], init[k][g]) for k, v in scales[learned].items()), (learned, g)


def test_timestep_groups_without_a_sampler_timestep_are_named(tmp_path, tiny_model_dir):
    args = [*tiny_args(tmp_path, tiny_model_dir, "digits_w4a8_rtn.yaml"),
            "--model.init_args.quant.act_timestep_boundaries", "[5, 10]"]
    with pytest.raises(ValueError, match=r"quant\.act_timestep_boundaries=\[5\.0, 10\.0\] leaves timestep group\(s\) "
                                         r"\[1\] without any of the sampler's timesteps of 100 training timesteps"):
        main(args)
