"""The LightningCLI end to end: tiny pretraining, sampling, config parsing and bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from accuquant_pl.cli import main
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def tiny_pretrain_args(tmp_path: Path) -> list[str]:
    override = {
        "trainer": {
            "max_steps": 6, "val_check_interval": 3, "limit_val_batches": 1, "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "tb"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging"},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
                {"class_path": "callbacks.SampleGrid",
                 "init_args": {"num_samples": 4, "num_inference_steps": 2}},
                {"class_path": "callbacks.ExportDiffusers", "init_args": {"dirpath": str(tmp_path / "export")}},
            ],
        },
        "model": {"init_args": {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                                "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
                                "attention_head_dim": 8,
                                "training": {"num_train_timesteps": 50, "warmup_steps": 2}}},
        "data": {"init_args": {"batch_size": 16}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(override))
    return ["fit", "--config", str(REPO / "configs" / "pretrain_digits.yaml"), "--config", str(path)]


def test_pretrain_writes_logs_checkpoint_and_diffusers_folder(tmp_path):
    main(tiny_pretrain_args(tmp_path))
    version = tmp_path / "tb" / "version_0"
    assert list(version.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert (version / "config.yaml").is_file(), "SaveConfigCallback wrote no config"
    assert (version / "samples.png").is_file()
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(tmp_path / "export", subfolder="unet")
    assert tuple(unet.config.block_out_channels) == (8, 16)


def test_predict_writes_grid_and_npz(tmp_path, tiny_model_dir):
    out = tmp_path / "samples"
    main(["predict", "--config", str(REPO / "configs" / "sample_digits.yaml"),
          "--model.init_args.pretrained", str(tiny_model_dir), "--model.init_args.num_inference_steps", "3",
          "--data.init_args.num_samples", "5", "--data.init_args.batch_size", "2",
          "--trainer.callbacks.init_args.output_dir", str(out), "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (5, 1, 8, 8) and np.abs(images).max() <= 1.0
    assert (out / "samples.png").stat().st_size > 0


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses(config, capsys):
    subcommand = "predict" if "sample" in config.name else "test" if "evaluate" in config.name else "fit"
    configs = ["--config", str(config)]
    if config.stem.endswith("_ddp"):  # an override composed onto its base config
        configs = ["--config", str(config.with_name(config.stem.removesuffix("_ddp") + ".yaml")), *configs]
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *configs, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"]


def test_print_config_without_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--print_config"])
    assert exit_info.value.code == 0
    assert "trainer:" in capsys.readouterr().out


def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"init_args": {"learning_rat": 0.1}}}))
    err = _cli_error(["fit", "--config", str(REPO / "configs" / "pretrain_digits.yaml"), "--config", str(bad),
                      "--print_config"], capsys)
    assert "learning_rat" in err


@pytest.mark.parametrize("config,args,named", [
    ("digits_w4a8_accuquant.yaml", ["--data.init_args.teacher", "models/digits-ddpm"], "Option 'teacher' is not accepted"),
    ("sample_digits.yaml", ["--model.class_path", "accuquant_pl.evaluation." + "DiffusionSampler"],  # gone on purpose
     "has no attribute 'DiffusionSampler'"),
])
def test_a_key_or_class_of_the_old_layout_is_named(config, args, named, capsys):
    # Renamed in the second layout pass (data ``teacher`` -> ``pretrained``, ``DiffusionSampler`` ->
    # ``SampleGeneration``): an old config fails before any work, naming what it no longer takes.
    subcommand = "predict" if config.startswith("sample") else "fit"
    err = _cli_error([subcommand, "--config", str(REPO / "configs" / config), *args, "--print_config"], capsys)
    assert named in err


def test_threads_sets_torch_and_refuses_zero(capsys):
    import torch

    main(["--config", str(REPO / "configs" / "pretrain_digits.yaml"), "--threads", "2"], run=False)
    assert torch.get_num_threads() == 2  # the suite's own 1 is restored after the test (conftest)
    err = _cli_error(["fit", "--config", str(REPO / "configs" / "pretrain_digits.yaml"), "--threads", "0",
                      "--print_config"], capsys)
    assert "threads" in err and "0" in err


def test_wrong_type_is_named(capsys):
    err = _cli_error(["fit", "--config", str(REPO / "configs" / "pretrain_digits.yaml"),
                      "--model.init_args.training.learning_rate", "fast", "--print_config"], capsys)
    assert "fast" in err and "learning_rate" in err


def test_missing_model_folder_fails_before_work(tmp_path):
    # jsonargparse re-raises instantiation errors as ValueError; the message still names the folder.
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-model.*does not exist"):
        main(["predict", "--config", str(REPO / "configs" / "sample_digits.yaml"),
              "--model.init_args.pretrained", str(tmp_path / "no-such-model")])


def test_folder_that_is_not_a_unet(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="AutoencoderKL"):
        main(["predict", "--config", str(REPO / "configs" / "sample_digits.yaml"),
              "--model.init_args.pretrained", str(tmp_path / "vae")])


def test_predict_from_a_quantized_folder(tmp_path, tiny_model_dir):
    import torch

    from accuquant_pl.deploy import export_quantized, load_quantized
    from accuquant_pl.diffusion import load_denoiser
    from accuquant_pl.quant import QuantSpec, rtn_quantize

    unet = rtn_quantize(load_denoiser(tiny_model_dir), QuantSpec(weight_bits=4),  # one sample per timestep group
                        [{"sample": torch.randn(4, 1, 8, 8), "timestep": torch.tensor([10, 35, 60, 85])}],
                        num_train_timesteps=100)
    export_quantized(unet, tmp_path / "q")
    out = tmp_path / "samples"
    cli = main(["predict", "--config", str(REPO / "configs" / "sample_digits.yaml"),
                "--model.init_args.pretrained", str(tiny_model_dir), "--model.init_args.quantized", str(tmp_path / "q"),
                "--model.init_args.num_inference_steps", "3", "--data.init_args.num_samples", "2",
                "--trainer.callbacks.init_args.output_dir", str(out), "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path)])
    loaded = load_quantized(tmp_path / "q")
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(cli.model.unet(x, 5).sample, loaded(x, 5).sample)
    assert np.load(out / "samples.npz")["images"].shape == (2, 1, 8, 8)
