import json

import pytest
import torch
from diffusers import DDIMScheduler

from accuquant_pl.diffusion import (
    inspect_model_folder,
    load_denoiser,
    load_scheduler_config,
    scheduler_from_config,
)


def test_pipeline_folder_loads(tiny_model_dir):
    unet = load_denoiser(tiny_model_dir)
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    sched = scheduler_from_config("ddim", load_scheduler_config(tiny_model_dir))
    assert isinstance(sched, DDIMScheduler) and sched.config.num_train_timesteps == 100


def test_bare_unet_folder_loads(tmp_path, tiny_model_dir):
    unet = load_denoiser(tiny_model_dir)
    unet.save_pretrained(tmp_path / "bare")
    again = load_denoiser(tmp_path / "bare")
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


@pytest.mark.parametrize("norm_type, expected", [("ada_norm_zero", "DiTTransformer2DModel"),
                                                 ("ada_norm_single", "PixArtTransformer2DModel")])
def test_legacy_transformer2d_configs_load_as_dit_or_pixart(tmp_path, norm_type, expected):
    # facebook/DiT-XL-2-256 and PixArt-alpha on the Hub say "Transformer2DModel" (with keys the new classes
    # do not take); diffusers reads them by norm_type, and so must we.
    from tests.tiny_models import save_transformer_folder, tiny_dit, tiny_pixart

    model = tiny_dit() if norm_type == "ada_norm_zero" else tiny_pixart()
    folder = save_transformer_folder(tmp_path / "legacy", model)
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    assert config["norm_type"] == norm_type
    config.update({"_class_name": "Transformer2DModel", "use_linear_projection": False, "only_cross_attention": False,
                   "num_vector_embeds": None})
    config_file.write_text(json.dumps(config))
    assert inspect_model_folder(folder).denoiser_class_name == expected
    loaded = load_denoiser(folder)
    assert type(loaded).__name__ == expected
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_legacy_transformer2d_config_of_another_kind_is_named(tmp_path, tiny_model_dir):
    load_denoiser(tiny_model_dir).save_pretrained(tmp_path / "weights")
    config = {"_class_name": "Transformer2DModel", "norm_type": "layer_norm"}
    (tmp_path / "weights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="norm_type 'layer_norm'"):
        inspect_model_folder(tmp_path / "weights")
