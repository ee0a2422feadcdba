"""Timestep-aware activation ranges: one step size per group of timesteps, chosen from the forward's timestep."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from quant_helpers import make_cond_unet, make_unet, unet_batches

import accuquant_pl
from accuquant_pl.deploy.artifact import export_quantized
from accuquant_pl.io import sha256_file
from accuquant_pl.quant import QuantSpec, calibrate_activations, quantize, unit_parameters
from accuquant_pl.quant.affine import fake_quantize
from accuquant_pl.quant.quantizers import ActivationQuantizer
from accuquant_pl.quant.timesteps import ROUTER_ATTR, TimestepRouter

BOUNDARIES = [300, 600]
SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


def _quantizer(timesteps: list[int] | None = None) -> tuple[ActivationQuantizer, TimestepRouter]:
    q = ActivationQuantizer(8, timestep_boundaries=BOUNDARIES)
    router = TimestepRouter(inspect.signature(lambda sample, timestep: None))  # a denoiser's forward
    q.timestep_source = router
    if timesteps is not None:
        router.timestep = torch.tensor(timesteps)
    return q, router


def _grouped_model(make=make_unet, cond: bool = False, **spec) -> torch.nn.Module:
    model = quantize(make(), QuantSpec(act_timestep_boundaries=BOUNDARIES, **spec))
    calibrate_activations(model, unet_batches(4, 8, cond))
    return model.eval()


def test_a_step_at_timestep_t_uses_its_groups_scale():
    q, router = _quantizer()
    scales, zero_points = torch.tensor([0.01, 0.05, 0.2]), torch.tensor([3, 100, 250], dtype=torch.int32)
    q.set_qparams(scales, zero_points)
    q.initialized.fill_(True)
    q._ready = True
    x = torch.randn(2, 3, 4, 4) * 3
    for t, g in [(0, 0), (299, 0), (300, 1), (599, 1), (600, 2), (999, 2)]:
        router.timestep = torch.tensor([t])
        expected = fake_quantize(x, scales[g], zero_points[g], 0, 255)
        assert torch.equal(q(x), expected), (t, g)
    # One timestep per sample: each sample in its own group, bit for bit as if quantized alone.
    router.timestep = torch.tensor([100, 800])
    expected = torch.cat([fake_quantize(x[:1], scales[0], zero_points[0], 0, 255),
                          fake_quantize(x[1:], scales[2], zero_points[2], 0, 255)])
    assert torch.equal(q(x), expected)
    # Attention folds heads into the batch axis (sample-major): 2 samples x 4 heads = 8 rows.
    rows = torch.randn(8, 5, 6)
    expected = torch.cat([fake_quantize(rows[:4], scales[0], zero_points[0], 0, 255),
                          fake_quantize(rows[4:], scales[2], zero_points[2], 0, 255)])
    assert torch.equal(q(rows), expected)


def test_each_group_is_initialised_from_its_own_timesteps():
    q, router = _quantizer()
    x = torch.randn(64, 8)
    for t, size in [(100, 0.1), (450, 1.0), (900, 10.0)]:
        router.timestep = torch.tensor([t])
        q.observe(x * size)
    q.init_from_observations("minmax")
    assert q.scale.shape == (3,) and q.scale[0] * 5 < q.scale[1] < q.scale[2] / 5
    single = ActivationQuantizer(8)
    single.calibrate(x * 10.0, "minmax")
    assert torch.allclose(q.scale[2], single.scale)


def test_a_group_without_calibration_data_is_named():
    q, _ = _quantizer([100])
    q.observe(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match=r"group 1 \(300 <= t < 600\).*group 2 \(600 <= t\)"):
        q.init_from_observations()


def test_a_grouped_quantizer_outside_a_model_forward_fails_loudly():
    model = _grouped_model()
    with pytest.raises(RuntimeError, match="no model forward is in progress"):
        model.conv_in(torch.randn(1, 1, 8, 8))
    with pytest.raises(RuntimeError, match="no timestep source"):
        ActivationQuantizer(8, timestep_boundaries=BOUNDARIES).observe(torch.randn(2, 3))


def test_only_the_timesteps_group_learns():
    q, router = _quantizer()
    for t in (100, 450, 900):
        router.timestep = torch.tensor([t])
        q.observe(torch.randn(16, 8))
    q.init_from_observations()
    router.timestep = torch.tensor([450])
    q(torch.randn(16, 8) * 2).pow(2).sum().backward()
    assert q.scale.grad[1] != 0 and q.scale.grad[0] == 0 and q.scale.grad[2] == 0


@pytest.mark.parametrize(("make", "cond"), [(make_unet, False), (make_cond_unet, True)])
def test_model_forward_feeds_every_quantizer_its_timestep(make, cond):
    model = _grouped_model(make, cond)
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer) and not m.is_off]
    assert quantizers and all(q.scale.shape[0] == 3 and q.timestep_source is getattr(model, ROUTER_ATTR)
                              for q in quantizers)
    learned = {id(p) for p in unit_parameters(model)["act_scale"]}
    assert all(id(q.scale) in learned for q in quantizers)
    # A batch of mixed timesteps equals its samples run one timestep at a time.
    inputs = unet_batches(1, 2, cond, seed=7)[0]
    inputs["timestep"] = torch.tensor([100, 800])
    seen = {}
    hook = model.conv_in.input_quantizer.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    with torch.no_grad():
        model(**inputs)
        mixed = seen.pop("x")
        alone = []
        for i, t in enumerate([100, 800]):
            model(**{k: v[i : i + 1] for k, v in inputs.items() if k != "timestep"}, timestep=torch.tensor(t))
            alone.append(seen.pop("x"))
    hook.remove()
    assert torch.equal(mixed, torch.cat(alone))
    q = model.conv_in.input_quantizer
    assert torch.equal(alone[1], fake_quantize(inputs["sample"][1:], q.scale[2].detach(), q.zero_point[2], 0, 255))


@pytest.mark.parametrize(("make", "cond"), [(make_unet, False), (make_cond_unet, True)])
def test_export_load_sample_is_bit_identical(tmp_path, make, cond):
    model = _grouped_model(make, cond, weight_bits=4)
    folder = export_quantized(model, tmp_path / "q", scheduler_config=SCHEDULER)
    entry = json.loads((folder / "quantization_map.json").read_text())["layers"]["conv_in"]
    assert entry["config"]["act"]["timestep_boundaries"] == [300.0, 600.0]
    loaded = accuquant_pl.load_quantized(folder)
    inputs = unet_batches(1, 3, cond, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)  # mixed timesteps per sample
        for t in (50, 450, 950):
            one = dict(inputs, timestep=torch.tensor(t))
            ref = model(**one).sample
            assert torch.equal(loaded(**one).sample, ref)
            int_model = accuquant_pl.load_quantized(folder, execution="int")
            assert ((int_model(**one).sample - ref).norm() / ref.norm()).item() < 5e-2
        # A batch across groups cannot take one activation scale per GEMM: it runs dequantized, exactly.
        assert torch.equal(int_model(**inputs).sample, model(**inputs).sample)


def test_a_model_without_groups_is_unchanged(tmp_path):
    model = quantize(make_unet(), QuantSpec(act_timestep_groups=1))
    calibrate_activations(model, unet_batches(4, 8))
    assert not hasattr(model, ROUTER_ATTR) and model.conv_in.input_quantizer.scale.shape == ()
    folder = export_quantized(model.eval(), tmp_path / "q", scheduler_config=SCHEDULER)
    # An export written before timestep groups existed has no timestep_boundaries key: it still loads.
    qmap_path = folder / "quantization_map.json"
    qmap = json.loads(qmap_path.read_text())
    for entry in [*qmap["layers"].values(), *qmap["attention_processors"].values()]:
        act = entry["config"]["act"] if "act" in entry["config"] else entry["config"]
        del act["timestep_boundaries"]
    del qmap["spec"]["act_timestep_boundaries"], qmap["spec"]["act_timestep_groups"]
    qmap_path.write_text(json.dumps(qmap, indent=2))
    checksums = json.loads((folder / "checksums.json").read_text())
    checksums["sha256"]["quantization_map.json"] = sha256_file(qmap_path)
    (folder / "checksums.json").write_text(json.dumps(checksums, indent=2))
    loaded = accuquant_pl.load_quantized(folder)
    inputs = unet_batches(1, 3, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


def test_groups_are_equal_shares_of_the_models_training_timesteps():
    spec = QuantSpec()  # the default: 4 groups
    assert spec.timestep_boundaries(1000) == [250.0, 500.0, 750.0]
    assert QuantSpec(act_timestep_groups=5).timestep_boundaries(100) == [20.0, 40.0, 60.0, 80.0]
    assert QuantSpec(act_timestep_groups=1).timestep_boundaries() == []
    assert QuantSpec(act_timestep_boundaries=[10]).timestep_boundaries(1000) == [10.0]  # explicit wins
    with pytest.raises(ValueError, match="act_timestep_groups=4 needs the model's number of training timesteps"):
        spec.timestep_boundaries()
    model = quantize(make_unet(), spec, num_train_timesteps=100)
    assert model.accuquant_spec.act_timestep_boundaries == [25.0, 50.0, 75.0]
    assert model.conv_in.input_quantizer.timestep_boundaries == (25.0, 50.0, 75.0)
    with pytest.raises(ValueError, match="act_timestep_groups=0"):
        QuantSpec(act_timestep_groups=0)


def test_boundaries_are_validated():
    with pytest.raises(ValueError, match="act_timestep_boundaries.*strictly increasing"):
        QuantSpec(act_timestep_boundaries=[500, 300])
    with pytest.raises(ValueError, match="act_timestep_boundaries.*finite"):
        QuantSpec(act_timestep_boundaries=[float("nan")])
    # A float (16-bit) tensor has no step size: no groups for it.
    assert QuantSpec(act_timestep_boundaries=[300]).act_config(16).timestep_boundaries == []
