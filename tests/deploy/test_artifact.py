import json

import pytest
import torch

from accuquant_pl.deploy import export_quantized, exported_scheduler_config, load_quantized
from accuquant_pl.quant import QuantSpec, rtn_quantize
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
    loaded, scheduler_config = load_quantized(tmp_path / "q"), exported_scheduler_config(tmp_path / "q")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 7).sample, model(x, 7).sample)
    assert scheduler_config == {"num_train_timesteps": 100}


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_quantized(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="unet_config.json"):
        load_quantized(tmp_path / "empty")


def test_config_of_another_class(tmp_path):
    export_quantized(_rtn_model(), tmp_path / "q")
    path = tmp_path / "q" / "unet_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKL"):
        load_quantized(tmp_path / "q")


def test_folders_of_the_earlier_fake_quantized_format_are_refused_by_name(tmp_path):
    # 0.1's first export format (float weights + quantizer state) is gone: such a folder must say so, not
    # load as something else.
    model = _rtn_model()
    export_quantized(model, tmp_path / "old")
    qmap_path = tmp_path / "old" / "quantization_map.json"
    qmap_path.write_text(json.dumps({"format": "accuquant-pl/quantization-map", "version": 1, "layers": {}}))
    with pytest.raises(ValueError, match="accuquant-pl/quantization-map.*export the model again"):
        load_quantized(tmp_path / "old")
