"""ONNX export in ONNX Runtime: the runtime quantizes to the PyTorch export's integer levels, runs every product as
an integer kernel, stands in for the denoiser in pipelines and `predict`, and refuses bad input by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from accuquant_pl.deploy import export_quantized, load_quantized, quantized_pipeline  # noqa: E402
from accuquant_pl.deploy.layers import DeployedConv2d, WeightFormat  # noqa: E402
from accuquant_pl.deploy.onnx_export import ONNX_NAME, export_onnx  # noqa: E402
from accuquant_pl.deploy.onnx_layers import OnnxConv2d, TimestepGroup  # noqa: E402
from accuquant_pl.deploy.onnx_levels import first_divergence, level_agreement  # noqa: E402
from accuquant_pl.deploy.onnx_runtime import OnnxDenoiser  # noqa: E402
from accuquant_pl.quant import QuantSpec, calibrate_activations, harden, quantize, quantized_layers  # noqa: E402
from accuquant_pl.quant.quantizers import ActivationQuantizer  # noqa: E402
from accuquant_pl.quant.spec import LayerQuantConfig  # noqa: E402
from tests.conftest import REPO, tiny_unet  # noqa: E402
from tests.quant.quant_helpers import make_cond_unet, unet_batches  # noqa: E402
from tests.quant.test_quant_transformers import dit_batches, pixart_batches  # noqa: E402
from tests.tiny_models import tiny_dit, tiny_pixart  # noqa: E402

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}


def calibrated(make, batches, **spec) -> torch.nn.Module:
    """A model as calibration leaves it: random hardened AdaRound rounding, calibrated activations, 4 timestep
    groups (the default spec) over 1000 training timesteps."""
    torch.manual_seed(0)
    model = quantize(make(), QuantSpec(adaround=True, **spec), 1000)
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.weight_quantizer.alpha.normal_(0, 2)
    calibrate_activations(model, batches(model))
    harden(model)
    return model.eval()


def _unet_batches(model):
    return unet_batches(2, 4)


def _cond_batches(model):
    return unet_batches(2, 4, cond=True)


CASES = {
    "unet_w4a8": (tiny_unet, _unet_batches, {"weight_bits": 4, "act_bits": 8}),
    "unet_w8a8": (tiny_unet, _unet_batches, {"weight_bits": 8, "act_bits": 8}),
    "dit_w4a8": (lambda: tiny_dit(learned_sigma=True), dit_batches, {"weight_bits": 4, "act_bits": 8}),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(quantized folder, ONNX folder) per case, exported once for the module."""
    root, out = tmp_path_factory.mktemp("onnx"), {}
    for name, (make, batches, spec) in CASES.items():
        folder = export_quantized(calibrated(make, batches, **spec), root / f"{name}_q", scheduler_config=SCHEDULER)
        out[name] = folder, export_onnx(folder, root / f"{name}_onnx")
    return out


def _forward_inputs(name: str, timestep: int = 620) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    t = torch.full((3,), timestep)
    if name.startswith("dit"):
        return {"hidden_states": torch.randn(3, 1, 8, 8, generator=g), "timestep": t,
                "class_labels": torch.tensor([1, 4, 7])}
    return {"sample": torch.randn(3, 1, 8, 8, generator=g), "timestep": t}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("timestep", [40, 620])  # two timestep groups: two rows of every range table
def test_runtime_levels_equal_the_pytorch_export_per_quantizer(exports, name, timestep):
    folder, onnx_folder = exports[name]
    inputs = _forward_inputs(name, timestep)
    report = level_agreement(folder, onnx_folder, inputs)
    model = load_quantized(folder)
    quantizers = {m.name for m in model.modules() if isinstance(m, ActivationQuantizer) and not m.is_off}
    assert set(report) == quantizers and len(quantizers) > 20
    # Float rounding (the runtime's fused GELU / normalisation kernels, GEMM summation order) can move a value at
    # a rounding tie by one level; nothing else may differ (measured: at most 0.2 % of the elements, DiT t=40).
    assert max(r.max_difference for r in report.values()) <= 1
    differing = sum(r.differing for r in report.values()) / sum(r.elements for r in report.values())
    assert differing < 1e-2, differing
    with torch.no_grad():
        want = model(**inputs).sample
        got = OnnxDenoiser(onnx_folder, threads=1)(**inputs).sample
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)


def test_every_product_runs_as_an_integer_kernel(exports, tmp_path):
    _, onnx_folder = exports["unet_w8a8"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(onnx_folder / ONNX_NAME), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    # Convolutions (as patch GEMMs), linears and both attention matmuls: int8 GEMMs with a float output.
    assert ops.count("MatMulIntegerToFloat") > 20
    assert not {"Conv", "MatMul", "Gemm", "FusedMatMul"} & set(ops), sorted(set(ops))


def test_graph_holds_the_exported_integers(exports):
    folder, onnx_folder = exports["unet_w4a8"]
    proto = onnx.load(str(onnx_folder / ONNX_NAME))
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name: i for i in proto.graph.initializer}
    model = load_quantized(folder)
    layer = model.get_submodule("down_blocks.0.resnets.0.conv1")
    levels = onnx.numpy_helper.to_array(inits["model.down_blocks.0.resnets.0.conv1.weight_levels_0"])
    assert inits["model.down_blocks.0.resnets.0.conv1.weight_levels_0"].data_type == onnx.TensorProto.INT4
    zero_point = onnx.numpy_helper.to_array(inits["model.down_blocks.0.resnets.0.conv1.weight_zero_point"])
    # INT4 holds the 0..15 levels shifted by 8, the zero point with them: (q - zp) is the export's.
    q = torch.from_numpy(levels.astype(np.int16)) + 8
    want = layer.levels().permute(2, 3, 1, 0).reshape(q.shape)
    assert torch.equal(q, want.to(torch.int16))
    assert torch.equal(torch.from_numpy(zero_point.astype(np.int16)) + 8, layer.weight_zero_point.to(torch.int16))
    assert not any(i.data_type == onnx.TensorProto.FLOAT and i.name.endswith("weight") for i in proto.graph.initializer)


def test_int4_file_is_smaller_and_runs_like_the_int8_file(exports, tmp_path):
    folder, onnx_folder = exports["unet_w4a8"]
    int8 = export_onnx(folder, tmp_path / "int8", int4=False)
    assert (onnx_folder / ONNX_NAME).stat().st_size < (int8 / ONNX_NAME).stat().st_size
    inputs = _forward_inputs("unet")
    with torch.no_grad():
        assert torch.equal(OnnxDenoiser(onnx_folder, 1)(**inputs).sample, OnnxDenoiser(int8, 1)(**inputs).sample)


def test_the_conv_layout_quantizes_alike(exports, tmp_path):
    folder, _ = exports["unet_w8a8"]
    conv = export_onnx(folder, tmp_path / "conv", conv_layout="conv")
    report = level_agreement(folder, conv, _forward_inputs("unet"))
    assert max(r.max_difference for r in report.values()) <= 1
    assert json.loads((conv / "onnx_export.json").read_text())["conv_layout"] == "conv"


def test_a_batch_across_timestep_groups_runs_each_group_with_its_ranges(exports):
    folder, onnx_folder = exports["unet_w8a8"]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 300, 620, 990])  # four groups, as the PyTorch model selects them per sample
    with torch.no_grad():
        want = load_quantized(folder)(x, t).sample
        got = OnnxDenoiser(onnx_folder, 1)(x, t).sample
        alone = torch.cat([OnnxDenoiser(onnx_folder, 1)(x[i:i + 1], t[i:i + 1]).sample for i in range(4)])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
    assert torch.equal(got, alone)


@pytest.mark.parametrize("make, batches, kwargs", [
    (make_cond_unet, _cond_batches, ("sample", "encoder_hidden_states")),
    (tiny_pixart, pixart_batches, ("hidden_states", "encoder_hidden_states")),
])
def test_text_conditional_denoisers(tmp_path, make, batches, kwargs):
    model = calibrated(make, batches, weight_bits=8, act_bits=8)
    folder = export_quantized(model, tmp_path / "q", scheduler_config=SCHEDULER)
    onnx_folder = export_onnx(folder, tmp_path / "onnx")
    b = batches(model)[0]
    inputs = {kwargs[0]: b["sample"], "timestep": torch.full((b["sample"].shape[0],), 420),
              kwargs[1]: b["encoder_hidden_states"]}
    report = level_agreement(folder, onnx_folder, inputs)
    assert len(report) > 40
    # These tiny random models amplify a one-level rounding flip downstream (in PyTorch alone, one level flipped
    # in one element of the text UNet's down_blocks.1.resnets.0.conv1 input changes 6.7 % of the later levels, by
    # up to 14): the first differing quantizer is where a wrong graph would show (see onnx_levels), and there it
    # must be a rounding flip.
    first = first_divergence(report)
    assert first is None or first[1].max_difference == 1, first
    assert sum(r.differing for r in report.values()) / sum(r.elements for r in report.values()) < 0.1


def test_pipeline_and_predict_run_on_the_onnx_folder(exports, tmp_path):
    from accuquant_pl.cli import main

    folder, onnx_folder = exports["unet_w8a8"]
    runs = {}
    for name, f in (("torch", folder), ("onnx", onnx_folder)):
        pipe = quantized_pipeline(f, onnx_threads=1)
        runs[name] = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                          output_type="np").images
    assert type(pipe.unet) is OnnxDenoiser and type(pipe).__name__ == "DDIMPipeline"
    assert np.abs(runs["onnx"] - runs["torch"]).max() < 0.05
    out = tmp_path / "samples"
    cli = main(["predict", "--config", str(REPO / "configs" / "sample_digits.yaml"),
                "--model.init_args.pretrained", str(REPO / "models" / "digits-ddpm"),
                "--model.init_args.quantized", str(onnx_folder), "--model.init_args.onnx_threads", "1",
                "--model.init_args.num_inference_steps", "3", "--data.init_args.num_samples", "2",
                "--trainer.callbacks.init_args.output_dir", str(out), "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path)])
    assert isinstance(cli.model.unet, OnnxDenoiser)
    assert np.load(out / "samples.npz")["images"].shape == (2, 1, 8, 8)


def test_the_command_writes_the_folder(exports, tmp_path):
    folder, _ = exports["dit_w4a8"]
    done = subprocess.run([sys.executable, "-m", "accuquant_pl.deploy.onnx_export", str(folder), str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "o" / ONNX_NAME).is_file() and "wrote" in done.stdout
    assert OnnxDenoiser(tmp_path / "o", 1).denoiser_class == "DiTTransformer2DModel"


# ----- bad input: one clear error, nothing half-written -----

def test_a_damaged_export_folder_writes_nothing(exports, tmp_path):
    folder, _ = exports["unet_w4a8"]
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    with open(damaged / "quantized.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(ValueError, match="quantized.safetensors does not match the SHA-256"):
        export_onnx(damaged, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_edited_graph_is_refused(exports, tmp_path):
    _, onnx_folder = exports["unet_w8a8"]
    copy = shutil.copytree(onnx_folder, tmp_path / "copy")
    proto = onnx.load(str(copy / ONNX_NAME))
    scale = next(i for i in proto.graph.initializer if i.name.endswith("weight_scale"))
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 2, scale.name))
    onnx.save(proto, str(copy / ONNX_NAME))
    with pytest.raises(ValueError, match="model.onnx does not match the SHA-256"):
        OnnxDenoiser(copy)


def test_a_folder_that_is_not_an_onnx_export(exports):
    folder, _ = exports["unet_w8a8"]
    with pytest.raises(FileNotFoundError, match="not an ONNX export folder"):
        OnnxDenoiser(folder)


def test_shape_outside_the_graph_is_named(exports):
    _, onnx_folder = exports["unet_w8a8"]
    denoiser = OnnxDenoiser(onnx_folder, 1)
    with pytest.raises(ValueError, match=r"sample of shape \(1, 1, 16, 16\).*\(batch, 1, 8, 8\)"):
        denoiser(torch.randn(1, 1, 16, 16), 5)
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        denoiser(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="takes no \\['encoder_hidden_states'\\]"):
        denoiser(torch.randn(2, 1, 8, 8), 5, encoder_hidden_states=torch.randn(2, 3, 8))


def test_a_missing_runtime_names_the_install(monkeypatch, exports):
    _, onnx_folder = exports["unet_w8a8"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without the wheel gives
    with pytest.raises(ImportError, match=r"onnxruntime is not installed .*pip install 'accuquant-pl\[onnx\]'"):
        OnnxDenoiser(onnx_folder)


def test_a_layer_the_graph_cannot_express_is_named():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=2)
    layer = DeployedConv2d(conv, WeightFormat(8, False, 0, tuple(conv.weight.shape)), LayerQuantConfig())
    with pytest.raises(NotImplementedError, match="'blocks.0' is a grouped convolution"):
        OnnxConv2d("blocks.0", layer, TimestepGroup([]), "matmul")
    with pytest.raises(ValueError, match="conv_layout 'nchw'"):
        export_onnx("unused", "unused", conv_layout="nchw")


def test_a_graph_of_one_timestep_group_holds_constant_ranges(exports, tmp_path):
    folder, onnx_folder = exports["unet_w8a8"]
    one = export_onnx(folder, tmp_path / "g2", conv_layout="conv", timestep_group=2)
    proto = onnx.load(str(one / ONNX_NAME))
    assert "Gather" not in {n.op_type for n in proto.graph.node if n.output[0] in
                            {i for q in proto.graph.node if q.op_type == "QuantizeLinear" for i in q.input[1:]}}
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # timestep 620 lies in group 2 (500 <= t < 750): same graph maths as the dynamic one
        torch.testing.assert_close(OnnxDenoiser(one, 1)(x, 620).sample, OnnxDenoiser(onnx_folder, 1)(x, 620).sample,
                                   rtol=0, atol=1e-4)
        with pytest.raises(ValueError, match="timestep group 2 only"):
            OnnxDenoiser(one, 1)(x, 100)
    with pytest.raises(ValueError, match="timestep_group=4 is not one of the model's 4 timestep groups"):
        export_onnx(folder, tmp_path / "g4", timestep_group=4)


def test_a_latent_pipeline_folder_runs_its_own_pipeline_on_the_onnx_denoiser(tmp_path):
    from diffusers import LDMPipeline

    from tests.deploy.test_pipelines import SEEDS, STEPS, generators, predicted, rtn_export
    from tests.tiny_models import rgb_unet, save_pipeline, vq_vae

    folder = save_pipeline(tmp_path / "ldm", rgb_unet(channels=3), vq_vae(3), "vqvae", scheduler="ddim")
    onnx_folder = export_onnx(rtn_export(folder, tmp_path / "q"), tmp_path / "onnx")
    # The Hub layout: diffusers' from_pretrained takes no non-diffusers component, so the FP UNet is skipped and
    # the ONNX Runtime denoiser registered in its place.
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "VQModel"],
        "scheduler": ["diffusers", "DDIMScheduler"]}))
    pipe = quantized_pipeline(onnx_folder, onnx_threads=1)
    assert type(pipe) is LDMPipeline and type(pipe.unet) is OnnxDenoiser
    with torch.no_grad():
        images = pipe(batch_size=len(SEEDS), generator=generators(SEEDS), num_inference_steps=STEPS, eta=0.0,
                      output_type="np").images
    torch.testing.assert_close(torch.from_numpy(images), predicted(folder, onnx_folder), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["model_index", "component folders"])
def test_stable_diffusion_pipeline_runs_the_onnx_text_unet_with_guidance(tmp_path, layout):
    pytest.importorskip("transformers")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from accuquant_pl.diffusion.loading import load_denoiser
    from tests.deploy.test_pipelines import (
        SEEDS,
        STEPS,
        assert_same_images,
        generators,
        predicted,
        rtn_export,
    )
    from tests.tiny_models import (
        SD_SCHEDULER,
        kl_vae,
        save_pipeline,
        save_text_encoder,
        text_conditional_unet,
    )

    parts = save_pipeline(tmp_path / "parts", text_conditional_unet(), kl_vae(4), "vae", scheduler="sd")
    encoder, tokenizer = save_text_encoder(parts)
    folder = parts
    if layout == "model_index":
        folder = tmp_path / "sd"
        StableDiffusionPipeline(vae=kl_vae(4), text_encoder=encoder, tokenizer=tokenizer, unet=load_denoiser(parts),
                                scheduler=DDIMScheduler(num_train_timesteps=100, **SD_SCHEDULER), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    onnx_folder = export_onnx(rtn_export(folder, tmp_path / "q"), tmp_path / "onnx")
    pipe = quantized_pipeline(onnx_folder, onnx_threads=1)
    assert type(pipe) is StableDiffusionPipeline and type(pipe.unet) is OnnxDenoiser
    prompts = ["a photo of a cat", "red car", "a cat"]
    cond, uncond = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True, negative_prompt=[""] * 3)
    torch.save({"cond": cond, "uncond": uncond[:1], "prompts": prompts}, tmp_path / "p.pt")
    with torch.no_grad():  # guidance: the pipeline doubles the batch ([uncond, cond]) into the graph's dynamic batch
        images = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=3.0,
                      num_inference_steps=STEPS, eta=0.0, generator=generators(SEEDS), output_type="np").images
    ours = predicted(folder, onnx_folder, conditioning={"prompt_embeddings": str(tmp_path / "p.pt"),
                                                        "guidance_scale": 3.0})
    assert_same_images(images, ours)
