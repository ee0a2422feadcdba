import json

import pytest
import torch

from accuquant_pl.quant import QuantSpec, rtn_quantize
from accuquant_pl.quantized_model import export_quantized, load_quantized_model
from tests.conftest import tiny_unet


def _rtn_model():
    model = tiny_unet()
    # the model trains on 100 timesteps (its scheduler config below): one sample in each quarter
    batches = [{"sample": torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(i)),
                "timestep": torch.tensor([5, 30, 55, 80]) + i} for i in range(3)]
    return rtn_quantize(model, QuantSpec(weight_bits=4, act_bits=8), batches, num_train_timesteps=100)


def test_export_load_round_trip_is_bit_identical(tmp_path):
    model = _rtn_model()
    export_quantized(model, tmp_path / "q", scheduler_config={"num_train_timesteps": 100})
    loaded, scheduler_config = load_quantized_model(tmp_path / "q")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 7).sample, model(x, 7).sample)
    assert scheduler_config == {"num_train_timesteps": 100}


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_quantized_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="unet_config.json"):
        load_quantized_model(tmp_path / "empty")


def test_config_of_another_class(tmp_path):
    export_quantized(_rtn_model(), tmp_path / "q")
    path = tmp_path / "q" / "unet_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKL"):
        load_quantized_model(tmp_path / "q")


def test_folders_of_the_earlier_fake_quantized_format_still_load(tmp_path):
    from accuquant_pl.quant import save_quantized

    model = _rtn_model()
    save_quantized(model, tmp_path / "old")  # float weights + quantizer state, as exported before packing
    (tmp_path / "old" / "unet_config.json").write_text(model.to_json_string())
    loaded, scheduler_config = load_quantized_model(tmp_path / "old")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 3).sample, model(x, 3).sample)
    assert scheduler_config is None
