"""Deployable quantized folders: packed integer weights, exact reload, size, damage detection, diffusers pipelines."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from safetensors.torch import load_file, save_file

import accuquant_pl
from accuquant_pl.deploy import export_quantized, freeze, quantized_pipeline, weight_bytes
from accuquant_pl.deploy.layers import DeployedLayer
from accuquant_pl.diffusion.loading import load_denoiser, load_scheduler_config
from accuquant_pl.io import sha256_file
from accuquant_pl.quant import (
    QuantSpec,
    calibrate_activations,
    harden,
    quantize,
    quantized_layers,
    rtn_quantize,
)
from tests.conftest import TEACHER, tiny_unet
from tests.quant.quant_helpers import make_cond_unet, unet_batches

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 100}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the same random models whatever ran before (restored by conftest)


def _adaround_model(make=tiny_unet, cond: bool = False, **spec):
    """A model as calibration leaves it: learned (here: random) AdaRound rounding, hardened; calibrated acts."""
    model = quantize(make(), QuantSpec(adaround=True, **spec))
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.weight_quantizer.alpha.normal_(0, 2)
    calibrate_activations(model, unet_batches(2, 2, cond))
    harden(model)
    return model.eval()


def _export(tmp_path: Path, model=None) -> Path:
    model = model if model is not None else _adaround_model(weight_bits=4, act_bits=8)
    return export_quantized(model, tmp_path / "q", scheduler_config=SCHEDULER)


@pytest.mark.parametrize(("make", "cond", "bits"), [(tiny_unet, False, 4), (tiny_unet, False, 8),
                                                    (make_cond_unet, True, 4)])
def test_loaded_equals_the_fake_quantized_model(tmp_path, make, cond, bits):
    model = _adaround_model(make, cond, weight_bits=bits, act_bits=8)
    folder = export_quantized(model, tmp_path / "q", scheduler_config=SCHEDULER)
    assert sorted(p.name for p in folder.iterdir()) == [
        "checksums.json", "quantization_map.json", "quantized.safetensors", "scheduler_config.json",
        "unet_config.json"]
    inputs = unet_batches(1, 3, cond, seed=9)[0]
    with torch.no_grad():
        ref = model(**inputs).sample
        loaded = accuquant_pl.load_quantized(folder)
        assert torch.equal(loaded(**inputs).sample, ref)  # dequantized on the fly: bit-identical
        assert torch.equal(accuquant_pl.load_quantized(folder, execution="cached")(**inputs).sample, ref)
        # Integer GEMMs: exact per layer up to float rounding (tests/deploy/test_packing.py), but through the
        # whole UNet a ~1e-7 difference can move a later activation across a rounding boundary, one level off.
        out = accuquant_pl.load_quantized(folder, execution="int")(**inputs).sample
        assert ((out - ref).norm() / ref.norm()).item() < 5e-2  # 1e-7 unless a level moves (<= 2e-2 seen)
    assert loaded.accuquant_spec == model.accuquant_spec and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())


def test_file_holds_packed_integers_not_float_weights(tmp_path):
    folder = _export(tmp_path)
    tensors = load_file(folder / "quantized.safetensors")
    qmap = json.loads((folder / "quantization_map.json").read_text())
    name = "down_blocks.1.resnets.0.conv1"  # 16 x 8 x 3 x 3 at 4 bits
    assert tensors[f"{name}.qweight"].dtype == torch.uint8 and tensors[f"{name}.qweight"].numel() == 16 * 8 * 9 // 2
    assert tensors[f"{name}.weight_scale"].shape == (16,) and tensors[f"{name}.weight_zero_point"].dtype == torch.uint8
    assert tensors["conv_in.qweight"].dtype == torch.uint8 and tensors["conv_in.qweight"].numel() == 8 * 9  # 8 bits
    assert f"{name}.weight" not in tensors and not any("weight_quantizer" in k for k in tensors)
    assert f"{name}.input_quantizer.scale" in tensors and "conv_norm_out.weight" in tensors
    entry = qmap["layers"][name]
    assert entry["weight"] == {"bits": 4, "symmetric": False, "axis": 0, "shape": [16, 8, 3, 3], "dtype": "float32",
                               "storage": "uint4x2"}
    assert entry["rounding"] == "adaround" and qmap["weights"]["sha256"] == sha256_file(folder / "quantized.safetensors")


def test_w4_export_of_the_teacher_is_at_most_a_fifth_of_fp32(tmp_path):
    fp_file = TEACHER / "unet" / "diffusion_pytorch_model.safetensors"
    model = rtn_quantize(load_denoiser(TEACHER), QuantSpec(weight_bits=4, act_bits=8, weight_init="minmax"),
                         [{"sample": torch.randn(4, 1, 16, 16), "timestep": torch.tensor([100, 300, 600, 900])}])
    folder = export_quantized(model, tmp_path / "q", scheduler_config=load_scheduler_config(TEACHER))
    ratio = (folder / "quantized.safetensors").stat().st_size / fp_file.stat().st_size
    assert ratio <= 0.2, ratio
    loaded = accuquant_pl.load_quantized(folder)
    fp_bytes = sum(p.numel() * p.element_size() for p in load_denoiser(TEACHER).parameters())
    assert weight_bytes(loaded) <= 0.2 * fp_bytes


def test_ddim_pipeline_samples_with_the_loaded_module(tmp_path):
    model = _adaround_model(weight_bits=4, act_bits=8)
    folder = _export(tmp_path, model)
    scheduler = DDIMScheduler.from_config(SCHEDULER)
    images = DDIMPipeline(unet=accuquant_pl.load_quantized(folder), scheduler=scheduler)(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1
    reference = DDIMPipeline(unet=model, scheduler=scheduler)(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert (images == reference).all()  # the same sampler on the fake-quantized model gives the same images
    pipe = quantized_pipeline(folder, scheduler="ddpm", execution="int")
    images = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 8, 8, 1)


def test_conditional_folder_is_not_a_ddim_pipeline(tmp_path):
    folder = export_quantized(_adaround_model(make_cond_unet, True), tmp_path / "q", scheduler_config=SCHEDULER)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        quantized_pipeline(folder)


def test_freeze_in_memory_and_weight_bytes():
    model = _adaround_model(weight_bits=4, act_bits=8)
    frozen = freeze(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(frozen(x, 3).sample, model(x, 3).sample)
    layers = [m for m in frozen.modules() if isinstance(m, DeployedLayer)]
    assert len(layers) == len(quantized_layers(model))
    packed = weight_bytes(frozen)
    accuquant_pl.set_execution(frozen, "cached")
    assert weight_bytes(frozen) > packed  # the float cache is counted


def test_export_refuses_models_that_are_not_final(tmp_path):
    soft = quantize(tiny_unet(), QuantSpec(adaround=True))
    calibrate_activations(soft, unet_batches(2, 2))
    with pytest.raises(ValueError, match="harden"):
        export_quantized(soft, tmp_path / "soft")
    uncalibrated = quantize(tiny_unet(), QuantSpec())
    with pytest.raises(ValueError, match="not calibrated"):
        export_quantized(uncalibrated, tmp_path / "raw")
    assert not (tmp_path / "soft").exists() and not (tmp_path / "raw").exists()


# ----- damaged folders: every problem is named, nothing loads silently wrong -----

def _rerecord_checksums(folder: Path) -> None:
    """Record the current checksum of every file, as someone who edits a folder by hand and hides it would."""
    path = folder / "checksums.json"
    record = json.loads(path.read_text())
    record["sha256"] = {name: sha256_file(folder / name) for name in record["sha256"] if (folder / name).is_file()}
    path.write_text(json.dumps(record))


def _rewrite_tensors(folder: Path, edit) -> None:
    """Edit the tensors and re-record their checksums: a consistent-looking but wrong folder."""
    path = folder / "quantized.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    _edit_map(folder, lambda m: m["weights"].__setitem__("sha256", sha256_file(path)))


def _edit_map(folder: Path, edit, rerecord: bool = True) -> None:
    """Edit the map; ``rerecord`` also re-records the checksums, so that only the entry checks stand guard."""
    path = folder / "quantization_map.json"
    qmap = json.loads(path.read_text())
    edit(qmap)
    path.write_text(json.dumps(qmap))
    if rerecord:
        _rerecord_checksums(folder)


def test_a_folder_exported_before_the_rename_of_source_model_still_names_its_fp_model(tmp_path):
    from accuquant_pl.deploy.artifact import exported_pretrained

    folder = export_quantized(_adaround_model(weight_bits=4, act_bits=8), tmp_path / "q", scheduler_config=SCHEDULER,
                              pretrained="models/digits-ddpm")
    assert exported_pretrained(folder) == "models/digits-ddpm"
    _edit_map(folder, lambda m: m.__setitem__("source_model", m.pop("pretrained")))
    assert exported_pretrained(folder) == "models/digits-ddpm"
    accuquant_pl.load_quantized(folder)  # still a valid folder of this format version


@pytest.mark.parametrize("name", ["quantized.safetensors", "quantization_map.json", "unet_config.json"])
def test_missing_file_named(tmp_path, name):
    folder = _export(tmp_path)
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        accuquant_pl.load_quantized(folder)


def test_missing_folder_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        accuquant_pl.load_quantized(tmp_path / "nowhere")


def test_truncated_or_modified_weights_file(tmp_path):
    folder = _export(tmp_path)
    path = folder / "quantized.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or modified"):
        accuquant_pl.load_quantized(folder)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit in the last weight byte
    with pytest.raises(ValueError, match="truncated or modified"):
        accuquant_pl.load_quantized(folder)


def test_missing_tensor_named(tmp_path):
    folder = _export(tmp_path)
    _rewrite_tensors(folder, lambda t: t.pop("up_blocks.0.resnets.0.conv1.weight_scale"))
    with pytest.raises(ValueError, match=r"missing \['up_blocks\.0\.resnets\.0\.conv1\.weight_scale'\]"):
        accuquant_pl.load_quantized(folder)


def test_extra_tensor_named(tmp_path):
    folder = _export(tmp_path)
    _rewrite_tensors(folder, lambda t: t.__setitem__("conv_in.weight", torch.zeros(8, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"unexpected \['conv_in\.weight'\]"):
        accuquant_pl.load_quantized(folder)


def test_wrong_shape_named(tmp_path):
    folder = _export(tmp_path)
    _rewrite_tensors(folder, lambda t: t.__setitem__("conv_out.weight_scale", torch.ones(3)))
    with pytest.raises(ValueError, match=r"conv_out\.weight_scale.*\(3,\).*\(1,\)"):
        accuquant_pl.load_quantized(folder)


def test_map_bits_that_do_not_match_the_tensors(tmp_path):
    folder = _export(tmp_path)
    name = "down_blocks.1.resnets.0.conv1"

    def to_8_bits(qmap):
        qmap["layers"][name]["weight"].update(bits=8, storage="uint8")
        qmap["layers"][name]["config"]["weight"]["bits"] = 8
        # The spec says so too (past the spec check, tested below): the tensors' shapes must still give it away.
        qmap["spec"]["overrides"] = [{"pattern": name, "weight_bits": 8, "act_bits": None}]

    _edit_map(folder, to_8_bits)
    with pytest.raises(ValueError, match=rf"{name}\.qweight.*576.*1152"):  # 4-bit bytes where 8-bit ones belong
        accuquant_pl.load_quantized(folder)


def test_map_entry_inconsistent_with_itself(tmp_path):
    folder = _export(tmp_path)
    _edit_map(folder, lambda m: m["layers"]["conv_in"]["weight"].__setitem__("bits", 4))
    with pytest.raises(ValueError, match=r"conv_in.*storage 'uint8' does not match 4-bit"):
        accuquant_pl.load_quantized(folder)
    folder = _export(tmp_path)

    def config_bits(qmap):
        qmap["layers"]["conv_in"]["config"]["weight"]["bits"] = 4
        # The spec says so too (past the spec check): the entry's format and config must still agree.
        qmap["spec"]["overrides"] = [{"pattern": "conv_in", "weight_bits": 4, "act_bits": None}]

    _edit_map(folder, config_bits)
    with pytest.raises(ValueError, match="conv_in.*disagrees"):
        accuquant_pl.load_quantized(folder)


def test_map_and_unet_config_disagree(tmp_path):
    folder = _export(tmp_path)
    _edit_map(folder, lambda m: m["layers"].__setitem__("extra.proj", m["layers"]["conv_in"]))
    with pytest.raises(ValueError, match="extra.proj"):
        accuquant_pl.load_quantized(folder)
    folder = _export(tmp_path)
    config = json.loads((folder / "unet_config.json").read_text())
    (folder / "unet_config.json").write_text(json.dumps({**config, "block_out_channels": [8, 32]}))
    with pytest.raises(ValueError, match=r"unet_config\.json does not match the SHA-256 recorded in checksums\.json"):
        accuquant_pl.load_quantized(folder)
    _rerecord_checksums(folder)
    with pytest.raises(ValueError, match=r"conv_shortcut'\.split: 16 \(the spec gives 32\)"):
        accuquant_pl.load_quantized(folder)


def test_levels_outside_the_range_named(tmp_path):
    folder = _export(tmp_path, _adaround_model(weight_bits=6, act_bits=8))
    name = "mid_block.resnets.0.conv2"

    def bad_level(t):
        t[f"{name}.qweight"][0] = 200  # a byte that no 6-bit level can be

    _rewrite_tensors(folder, bad_level)
    with pytest.raises(ValueError, match=rf"{name}.*outside \[0, 63\]"):
        accuquant_pl.load_quantized(folder)


def test_uncalibrated_activation_named(tmp_path):
    folder = _export(tmp_path)
    _rewrite_tensors(folder, lambda t: t["conv_out.input_quantizer.initialized"].fill_(False))
    with pytest.raises(ValueError, match=r"conv_out\.input_quantizer.*not calibrated"):
        accuquant_pl.load_quantized(folder)


def test_foreign_map_format(tmp_path):
    folder = _export(tmp_path)
    _edit_map(folder, lambda m: m.__setitem__("version", 99))
    with pytest.raises(ValueError, match="v99"):
        accuquant_pl.load_quantized(folder)
    (folder / "quantization_map.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        accuquant_pl.load_quantized(folder)


def test_the_folder_can_be_copied(tmp_path):
    model = _adaround_model(weight_bits=4, act_bits=8)
    folder = _export(tmp_path, model)
    copied = shutil.copytree(folder, tmp_path / "elsewhere" / "model")
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(accuquant_pl.load_quantized(copied)(x, 1).sample, copy.deepcopy(model)(x, 1).sample)


# ----- tampering: the map and configs are covered by checksums, and every entry is checked on its own too -----

ACT_EDITS = {
    "activation bits 8 -> 4": lambda m: m["layers"]["down_blocks.0.resnets.0.conv1"]["config"]["act"].update(bits=4),
    "activation symmetric flipped": lambda m: m["layers"]["mid_block.resnets.0.conv2"]["config"]["act"].update(
        symmetric=True),
    "attention processor bits 8 -> 4": lambda m: m["attention_processors"][
        "down_blocks.1.attentions.0.processor"]["config"].update(bits=4),
}


@pytest.mark.parametrize("edit", sorted(ACT_EDITS))
def test_an_edited_map_is_refused_by_its_checksum(tmp_path, edit):
    folder = _export(tmp_path)
    _edit_map(folder, ACT_EDITS[edit], rerecord=False)
    with pytest.raises(ValueError, match=r"quantization_map\.json does not match the SHA-256 recorded in checksums"):
        accuquant_pl.load_quantized(folder)


@pytest.mark.parametrize("edit", sorted(ACT_EDITS))
def test_an_edited_activation_entry_is_refused_even_with_recomputed_checksums(tmp_path, edit):
    folder = _export(tmp_path)
    _edit_map(folder, ACT_EDITS[edit])
    with pytest.raises(ValueError, match=r"disagrees with its own spec: (layer|processor) '[\w.]+'\.(act\.)?"
                                         r"(bits: 4 \(the spec gives 8\)|symmetric: True \(the spec gives False\))"):
        accuquant_pl.load_quantized(folder)


def test_activation_bits_lowered_everywhere_with_the_spec_are_caught_by_the_zero_points(tmp_path):
    folder = _export(tmp_path)

    def all_acts_to_4_bits(qmap):
        qmap["spec"]["act_bits"] = 4
        for entry in qmap["layers"].values():
            if entry["config"]["act"]["bits"] == 8 and entry["config"]["weight"]["bits"] == 4:  # not first / last
                entry["config"]["act"]["bits"] = 4
        for entry in qmap["attention_processors"].values():
            entry["config"]["bits"] = 4

    _edit_map(folder, all_acts_to_4_bits)
    with pytest.raises(ValueError, match=r"zero point \d+ is outside the integer range \[0, 15\]"):
        accuquant_pl.load_quantized(folder)


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_an_invalid_activation_scale_is_named(tmp_path, value):
    folder = _export(tmp_path)
    _rewrite_tensors(folder, lambda t: t["mid_block.resnets.0.conv1.input_quantizer.scale"].fill_(value))
    with pytest.raises(ValueError, match=r"mid_block\.resnets\.0\.conv1\.input_quantizer.*scale .* is invalid"):
        accuquant_pl.load_quantized(folder)


def test_an_untampered_folder_loads_bit_identical_with_its_checksums(tmp_path):
    model = _adaround_model(weight_bits=4, act_bits=8)
    folder = _export(tmp_path, model)
    record = json.loads((folder / "checksums.json").read_text())["sha256"]
    assert sorted(record) == ["quantization_map.json", "quantized.safetensors", "scheduler_config.json",
                              "unet_config.json"]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(accuquant_pl.load_quantized(folder)(x, 3).sample, model(x, 3).sample)


def test_a_map_without_its_spec_or_with_an_extra_file_is_refused(tmp_path):
    folder = _export(tmp_path)
    _edit_map(folder, lambda m: m.__setitem__("spec", None))
    with pytest.raises(ValueError, match=r"quantization_map\.json records no QuantSpec"):
        accuquant_pl.load_quantized(folder)
    folder = _export(tmp_path)
    (folder / "notes.txt").write_text("added after export")
    with pytest.raises(ValueError, match=r"records no checksum of \['notes\.txt'\]"):
        accuquant_pl.load_quantized(folder)


def test_export_refuses_a_spec_that_is_not_the_models(tmp_path):
    model = _adaround_model(weight_bits=4, act_bits=8)
    with pytest.raises(ValueError, match=r"disagrees with its own spec: layer '[\w.]+'\.act\.bits: 8 \(the spec gives 6\)"):
        export_quantized(model, tmp_path / "q", QuantSpec(weight_bits=4, act_bits=6, adaround=True))
    assert not (tmp_path / "q").exists()


def test_a_float_network_input_exports_and_loads_bit_identical(tmp_path):
    model = _adaround_model(weight_bits=4, act_bits=8, input_bits=16)
    assert model.conv_in.input_quantizer.is_off
    folder = _export(tmp_path, model)
    loaded = accuquant_pl.load_quantized(folder)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 7).sample, model(x, 7).sample)
    assert json.loads((folder / "quantization_map.json").read_text())["layers"]["conv_in"]["config"]["act"]["bits"] == 16
