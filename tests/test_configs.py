"""Every shipped config parses (``--print_config``) and runs a tiny smoke version of itself.

Full configs are parsed alone; override configs (no ``model`` section, e.g. ``*_ddp.yaml``) are parsed alone
and composed with their base config (the name without ``_ddp``). The smoke runs use tiny random models of the
classes each config family expects (``tests/tiny_models.py``) and an extra ``--config`` that shrinks sizes,
steps and iterations, as ``tests/calibration/test_calibration_cli.py`` does. DDP overrides run as 2 CPU
processes (gloo) through ``main.py`` in a subprocess, marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from accuquant_pl.cli import main
from accuquant_pl.deploy import load_quantized
from accuquant_pl.diffusion.loading import load_denoiser
from accuquant_pl.quant import reconstruction_units
from tests.conftest import REPO, checkpoint_and_export_callbacks
from tests.tiny_models import model_folder

CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def _load(config: Path) -> dict:
    return yaml.safe_load(config.read_text()) or {}


def is_override(config: Path) -> bool:
    """An override adds to a base config (strategy, batch size) and has no model of its own."""
    return "model" not in _load(config)


def base_of(config: Path) -> Path:
    if not config.stem.endswith("_ddp"):
        raise ValueError(f"override {config.name} should be named <base>_ddp.yaml")
    return config.with_name(config.stem[: -len("_ddp")] + ".yaml")


def subcommand(config: Path) -> str:
    if config.name.startswith("sample"):
        return "predict"
    if config.name.startswith("evaluate"):
        return "test"
    return "fit"


def family(config: Path) -> str:
    """Which tiny model stands in for the config's model folder."""
    if config.name.startswith("digits_dit_"):
        return "dit"
    return config.name.split("_")[0] if config.name.split("_")[0] in ("cifar10", "ldm", "t2i") else "digits"


OVERRIDES = [c for c in CONFIGS if is_override(c)]
FULL = [c for c in CONFIGS if not is_override(c)]
CALIBRATIONS = [c for c in FULL if _load(c)["model"]["class_path"].endswith("BlockReconstruction")]


# ------------------------------------------------------------------------------------------------- parsing


def print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", FULL, ids=[c.name for c in FULL])
def test_full_config_parses(config, capsys):
    printed = print_config([subcommand(config), "--config", str(config)], capsys)
    assert printed["model"]["class_path"] == _load(config)["model"]["class_path"]


@pytest.mark.parametrize("config", OVERRIDES, ids=[c.name for c in OVERRIDES])
def test_override_parses_alone(config, capsys):
    # Needs the data section's class_path: without it jsonargparse checks init_args against LightningDataModule.
    print_config(["fit", "--config", str(config)], capsys)


@pytest.mark.parametrize("config", OVERRIDES, ids=[c.name for c in OVERRIDES])
def test_override_parses_on_its_base(config, capsys):
    base = base_of(config)
    assert base.is_file(), f"{config.name}: no base config {base.name}"
    override = _load(config)
    printed = print_config(["fit", "--config", str(base), "--config", str(config)], capsys)
    for key, value in override.get("trainer", {}).items():
        assert printed["trainer"][key] == value, f"trainer.{key}"
    for key, value in override.get("data", {}).get("init_args", {}).items():
        assert printed["data"]["init_args"][key] == value, f"data.init_args.{key}"
    # The base's other settings survive the composition.
    base_data = _load(base)["data"]["init_args"]
    for key in ("num_inference_steps", "num_trajectories", "group_size"):
        assert printed["data"]["init_args"][key] == base_data[key], f"data.init_args.{key}"
    assert printed["model"]["init_args"]["objective"] == _load(base)["model"]["init_args"]["objective"]


def test_multi_device_overrides_cover_the_new_families():
    names = {c.name for c in OVERRIDES}
    for base in ("cifar10_w4a8_accuquant", "ldm_w4a8_accuquant", "t2i_w8a8_accuquant"):
        assert f"{base}_ddp.yaml" in names
    for config in OVERRIDES:
        trainer = _load(config)["trainer"]
        assert trainer["strategy"] == "ddp" and trainer.get("precision", "32") != "16-mixed"


def test_every_config_has_a_smoke_test():
    smoked = {c.name for c in CALIBRATIONS} | {c.name for c in OVERRIDES} | set(OTHER_SMOKES)
    missing = sorted({c.name for c in CONFIGS} - smoked)
    assert not missing, f"configs without a smoke test: {missing}"


# ------------------------------------------------------------------------------------------------- smoke runs


def tiny_overrides(tmp_path: Path, config: Path, name: str = "run") -> dict:
    """Sizes, steps and iterations shrunk for a CPU smoke run of a calibration config."""
    root = tmp_path / name
    folder = model_folder(family(config), tmp_path)
    data = _load(config)["data"]["init_args"]
    # every (trajectory, step) item, so that each timestep group sees calibration inputs
    shipped = _load(config)["model"]["init_args"]
    model = {"pretrained": str(folder), "act_calibration_samples": 20}
    if shipped.get("objective") != "rtn":
        model["iterations_per_unit"] = 1
    if shipped.get("final_stage"):
        # the tiny schedule has 5 steps
        model["final_stage"] = {"iterations": 1, "group_size": 2 if shipped["final_stage"].get("group_size") else None}
    tiny_data = {"num_inference_steps": 5, "num_trajectories": 4, "batch_size": 2, "sampling_batch_size": 4,
                 "cache_dir": str(tmp_path / "cache"), "group_size": min(data.get("group_size", 1), 2),
                 "starts_per_batch": min(data.get("starts_per_batch", 1), 2)}
    if (data.get("conditioning") or {}).get("prompt_embeddings"):
        tiny_data["conditioning"] = {**data["conditioning"], "prompt_embeddings": str(tmp_path / "prompts.pt")}
    return {
        "trainer": {
            "accelerator": "cpu", "devices": 1, "default_root_dir": str(root), "enable_progress_bar": False,
            "enable_model_summary": False, "logger": False,
            "callbacks": checkpoint_and_export_callbacks(root),
        },
        "model": {"init_args": model},
        "data": {"init_args": tiny_data},
    }


def tiny_config_args(tmp_path: Path, config: Path, name: str = "run") -> list[str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_overrides(tmp_path, config, name)))
    return ["fit", "--config", str(config), "--config", str(path)]


@pytest.mark.parametrize("config", CALIBRATIONS, ids=[c.name for c in CALIBRATIONS])
def test_calibration_config_runs_tiny(tmp_path, config):
    cli = main(tiny_config_args(tmp_path, config))
    module = cli.model
    rtn = _load(config)["model"]["init_args"].get("objective") == "rtn"
    assert len(module.done_units) == (0 if rtn else len(module.unit_names))
    unet = load_quantized(tmp_path / "run" / "quantized")
    assert type(unet) is type(load_denoiser(module.hparams.pretrained))
    assert [n for n, _ in reconstruction_units(unet)] == module.unit_names


@pytest.mark.slow
@pytest.mark.parametrize("config", OVERRIDES, ids=[c.name for c in OVERRIDES])
def test_multi_device_override_runs_tiny_on_two_cpu_processes(tmp_path, config):
    base = base_of(config)
    args = tiny_config_args(tmp_path, base)
    # The override's strategy and precision, with 2 CPU processes standing in for its GPUs; per-device batch 2.
    args[3:3] = ["--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "main.py", *args, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                           "--data.init_args.batch_size", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    unet = load_quantized(tmp_path / "run" / "quantized")
    assert type(unet).__name__ == load_denoiser(model_folder(family(base), tmp_path)).__class__.__name__


def _smoke_pretrain(tmp_path: Path) -> None:
    from tests.test_cli import tiny_pretrain_args

    main(tiny_pretrain_args(tmp_path))
    assert (tmp_path / "export" / "unet" / "config.json").is_file()


def _smoke_pretrain_dit(tmp_path: Path) -> None:
    """The DiT teacher's pretraining, tiny: class-conditional samples in the grid, transformer/ + scheduler/ out."""
    from accuquant_pl.diffusion.loading import inspect_model_folder
    from tests.test_cli import tiny_pretrain_args

    args = tiny_pretrain_args(tmp_path)
    override = yaml.safe_load(Path(args[-1]).read_text())
    override["model"] = {"init_args": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
                                       "training": {"num_train_timesteps": 50, "warmup_steps": 2}}}
    Path(args[-1]).write_text(yaml.safe_dump(override))
    main(["fit", "--config", str(CONFIG_DIR / "pretrain_digits_dit.yaml"), "--config", args[-1]])
    folder = inspect_model_folder(tmp_path / "export")
    assert folder.denoiser_class_name == "DiTTransformer2DModel" and folder.denoiser_dir.name == "transformer"
    assert (tmp_path / "tb" / "version_0" / "samples.png").is_file()


def _smoke_sample(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    main(["predict", "--config", str(CONFIG_DIR / "sample_digits.yaml"),
          "--model.init_args.pretrained", str(model_folder("digits", tmp_path)),
          "--model.init_args.num_inference_steps", "2", "--data.init_args.num_samples", "3",
          "--trainer.callbacks.init_args.output_dir", str(out), "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    assert np.load(out / "samples.npz")["images"].shape == (3, 1, 8, 8)


def _smoke_evaluate(tmp_path: Path) -> None:
    from tests.evaluation.test_module import eval_args, read_metrics

    main(eval_args(tmp_path, model_folder("digits", tmp_path), "eval", kid=False))
    assert read_metrics(tmp_path / "eval")["mse"] == 0.0


OTHER_SMOKES = {"pretrain_digits.yaml": _smoke_pretrain, "pretrain_digits_dit.yaml": _smoke_pretrain_dit,
                "sample_digits.yaml": _smoke_sample,
                "evaluate_digits.yaml": _smoke_evaluate}


@pytest.mark.parametrize("name", sorted(OTHER_SMOKES))
def test_other_config_runs_tiny(tmp_path, name):
    OTHER_SMOKES[name](tmp_path)
