import json

import pytest
import torch
from diffusers import DDIMScheduler

from accuquant_pl.diffusion import (
    inspect_model_folder,
    load_scheduler_config,
    load_unet,
    scheduler_from_config,
)


def test_pipeline_folder_loads(tiny_model_dir):
    unet = load_unet(tiny_model_dir)
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    sched = scheduler_from_config("ddim", load_scheduler_config(tiny_model_dir))
    assert isinstance(sched, DDIMScheduler) and sched.config.num_train_timesteps == 100


def test_bare_unet_folder_loads(tmp_path, tiny_model_dir):
    unet = load_unet(tiny_model_dir)
    unet.save_pretrained(tmp_path / "bare")
    again = load_unet(tmp_path / "bare")
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(unet(x, 3).sample, again(x, 3).sample)
    with pytest.raises(FileNotFoundError, match="no scheduler"):
        load_scheduler_config(tmp_path / "bare")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        inspect_model_folder(tmp_path / "does-not-exist")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="f.json"):
        inspect_model_folder(tmp_path / "f.json")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        inspect_model_folder(tmp_path)


def test_config_that_is_not_a_unet(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKL"):
        inspect_model_folder(tmp_path)


def test_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        inspect_model_folder(tmp_path)


def test_unet_config_without_weights(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "unet" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="weights"):
        inspect_model_folder(tmp_path)


def test_unknown_scheduler_name(tiny_model_dir):
    with pytest.raises(ValueError, match="'heun3'"):
        scheduler_from_config("heun3", load_scheduler_config(tiny_model_dir))
