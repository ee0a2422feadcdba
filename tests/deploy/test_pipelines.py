"""quantized_pipeline: the diffusers pipeline that matches an exported model, and its images equal `predict`'s for
the same seeds and settings (tiny models with random weights, W8A8 round-to-nearest exports)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    LDMPipeline,
    UNet2DConditionModel,
)

from accuquant_pl.deploy import export_quantized, quantized_pipeline
from accuquant_pl.diffusion.loading import load_denoiser, load_scheduler_config
from accuquant_pl.evaluation.generation import SampleGeneration
from accuquant_pl.quant import QuantSpec, rtn_quantize
from tests.conftest import tiny_unet
from tests.tiny_models import (
    PROMPT_TOKENS,
    TEXT_DIM,
    kl_vae,
    rgb_unet,
    save_pipeline,
    save_text_encoder,
    text_conditional_unet,
    vq_vae,
)

STEPS = 5
SEEDS = [0, 1, 2]


def rtn_export(folder: Path, out: Path, record_source: bool = True) -> Path:
    """W8A8 round-to-nearest of the folder's UNet, activation ranges from random inputs over all timesteps."""
    unet = load_denoiser(folder)
    cfg, scheduler = unet.config, load_scheduler_config(folder)
    steps = scheduler["num_train_timesteps"]
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(4):
        b = {"sample": torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
             "timestep": torch.arange(4) * (steps // 4) + i}
        if isinstance(unet, UNet2DConditionModel):
            b["encoder_hidden_states"] = torch.randn(4, PROMPT_TOKENS, TEXT_DIM, generator=g)
        if getattr(cfg, "num_class_embeds", None):
            b["class_labels"] = torch.arange(4) % cfg.num_class_embeds
        batches.append(b)
    model = rtn_quantize(unet, QuantSpec(weight_bits=8, act_bits=8), batches, steps)
    return export_quantized(model, out, scheduler_config=scheduler,
                            pretrained=str(folder) if record_source else None)


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def predicted(folder: Path, quantized: Path, **kwargs) -> torch.Tensor:
    """``predict``'s images for SEEDS as (B, H, W, C) in [0, 1] (the pipelines' numpy layout)."""
    sampler = SampleGeneration(pretrained=str(folder), quantized=str(quantized), num_inference_steps=STEPS, **kwargs)
    with torch.no_grad():
        images = sampler.predict_step(torch.tensor(SEEDS), 0)
    return ((images + 1) / 2).permute(0, 2, 3, 1)


def assert_same_images(pipeline_images, ours: torch.Tensor) -> None:
    theirs = torch.from_numpy(pipeline_images)
    assert theirs.shape == ours.shape
    # (x / 2 + 0.5) in the pipeline vs clamp to [-1, 1] then (x + 1) / 2 here: equal up to float rounding
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_pixel_unet_gives_a_ddim_pipeline_whose_images_equal_predict(tmp_path):
    folder = save_pipeline(tmp_path / "fp", tiny_unet())
    quantized = rtn_export(folder, tmp_path / "q", record_source=False)
    pipe = quantized_pipeline(quantized)
    assert type(pipe) is DDIMPipeline and type(pipe.unet).__name__ == "UNet2DModel"
    with torch.no_grad():
        images = pipe(batch_size=len(SEEDS), generator=generators(SEEDS), num_inference_steps=STEPS, eta=0.0,
                      output_type="np").images
    assert_same_images(images, predicted(folder, quantized))
    assert type(quantized_pipeline(quantized, scheduler="ddpm")) is DDPMPipeline


@pytest.mark.parametrize("scheduler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_samplers_draw_the_same_step_noise_as_predict(tmp_path, scheduler, eta):
    # Seed s's generator gives the initial noise and then every step's noise, in both.
    folder = save_pipeline(tmp_path / "fp", tiny_unet())
    quantized = rtn_export(folder, tmp_path / "q", record_source=False)
    pipe = quantized_pipeline(quantized, scheduler=scheduler)
    kwargs = {"eta": eta} if scheduler == "ddim" else {}
    with torch.no_grad():
        images = pipe(batch_size=len(SEEDS), generator=generators(SEEDS), num_inference_steps=STEPS,
                      output_type="np", **kwargs).images
        deterministic = pipe(batch_size=len(SEEDS), generator=generators(SEEDS), num_inference_steps=STEPS,
                             output_type="np", **({"eta": 0.0} if scheduler == "ddim" else {})).images
    ours = predicted(folder, quantized, scheduler=scheduler, eta=eta)
    assert_same_images(images, ours)
    if scheduler == "ddim":
        assert not torch.allclose(torch.from_numpy(deterministic), ours, atol=1e-3)  # the noise was drawn
    # One sample's images do not depend on the batch it is drawn in.
    sampler = SampleGeneration(pretrained=str(folder), quantized=str(quantized), num_inference_steps=STEPS,
                               scheduler=scheduler, eta=eta)
    with torch.no_grad():
        alone = sampler.predict_step(torch.tensor(SEEDS[1:2]), 0)
    torch.testing.assert_close((alone + 1) / 2, ours[1:2].permute(0, 3, 1, 2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("autoencoder", ["vqvae", "vae"])
def test_latent_unet_gives_an_ldm_pipeline_that_decodes_like_predict(tmp_path, autoencoder):
    vae = vq_vae(3) if autoencoder == "vqvae" else kl_vae(3)
    folder = save_pipeline(tmp_path / "ldm", rgb_unet(channels=3), vae, autoencoder, scheduler="ddim")
    quantized = rtn_export(folder, tmp_path / "q")
    pipe = quantized_pipeline(quantized)  # the autoencoder from the FP folder the export recorded
    assert type(pipe) is LDMPipeline
    with torch.no_grad():
        images = pipe(batch_size=len(SEEDS), generator=generators(SEEDS), num_inference_steps=STEPS, eta=0.0,
                      output_type="np").images
    assert images.shape == (3, 16, 16, 3)
    assert_same_images(images, predicted(folder, quantized))


@pytest.mark.parametrize("layout", ["model_index", "component folders"])
def test_text_unet_gives_the_stable_diffusion_pipeline_of_its_folder(tmp_path, layout):
    pytest.importorskip("transformers")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from tests.tiny_models import SD_SCHEDULER

    parts = save_pipeline(tmp_path / "parts", text_conditional_unet(), kl_vae(4), "vae", scheduler="sd")
    encoder, tokenizer = save_text_encoder(parts)
    fp_unet = load_denoiser(parts)
    if layout == "model_index":
        fp = StableDiffusionPipeline(vae=kl_vae(4), text_encoder=encoder, tokenizer=tokenizer, unet=fp_unet,
                                     scheduler=DDIMScheduler(num_train_timesteps=100, **SD_SCHEDULER),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        folder = tmp_path / "sd"
        fp.save_pretrained(folder)
    else:  # unet/, vae/, text_encoder/, tokenizer/, scheduler/ without model_index.json: assembled part by part
        folder = parts
    quantized = rtn_export(folder, tmp_path / "q")
    pipe = quantized_pipeline(quantized)
    assert type(pipe) is StableDiffusionPipeline
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.unet is not fp_unet
    prompts = ["a photo of a cat", "red car", "a cat"]
    cond, uncond = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True, negative_prompt=[""] * 3)
    torch.save({"cond": cond, "uncond": uncond[:1], "prompts": prompts}, tmp_path / "p.pt")
    with torch.no_grad():
        images = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=3.0,
                      num_inference_steps=STEPS, eta=0.0, generator=generators(SEEDS), output_type="np").images
    ours = predicted(folder, quantized, conditioning={"prompt_embeddings": str(tmp_path / "p.pt"),
                                                      "guidance_scale": 3.0})
    assert_same_images(images, ours)


def test_the_recorded_fp_folder_must_exist_or_be_given(tmp_path):
    folder = save_pipeline(tmp_path / "ldm", rgb_unet(channels=3), vq_vae(3), "vqvae", scheduler="ddim")
    quantized = rtn_export(folder, tmp_path / "q")
    moved = folder.rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"the FP model .*ldm' that .* pass quantized_pipeline\(folder, pretrained="):
        quantized_pipeline(quantized)
    assert type(quantized_pipeline(quantized, pretrained=moved)) is LDMPipeline


def test_models_without_a_diffusers_pipeline_are_named(tmp_path):
    folder = save_pipeline(tmp_path / "class", rgb_unet(channels=3, num_class_embeds=4))
    with pytest.raises(TypeError, match="class-conditional UNet2DModel has no diffusers pipeline"):
        quantized_pipeline(rtn_export(folder, tmp_path / "q"))
    text = save_pipeline(tmp_path / "text", text_conditional_unet(), kl_vae(4), "vae", scheduler="sd")
    with pytest.raises(TypeError, match="text_encoder/ and tokenizer/"):
        quantized_pipeline(rtn_export(text, tmp_path / "q2"))


def test_latent_dit_gives_a_dit_pipeline_whose_guided_images_equal_predict(tmp_path):
    from diffusers import DiTPipeline

    from accuquant_pl.diffusion import ConditioningSpec
    from tests.tiny_models import save_transformer_folder, tiny_dit

    # DiTPipeline's unconditional class is 1000 (ImageNet's null class): 1000 labels, learned sigma, 4 latent channels
    folder = save_transformer_folder(tmp_path / "dit", tiny_dit(channels=4, num_classes=1000, learned_sigma=True),
                                     kl_vae(4), scheduler="ddim")
    quantized = rtn_dit_export(folder, tmp_path / "q")
    pipe = quantized_pipeline(quantized)
    assert type(pipe) is DiTPipeline and type(pipe.transformer).__name__ == "DiTTransformer2DModel"
    labels = [3, 7, 1]
    with torch.no_grad():
        images = pipe(class_labels=labels, guidance_scale=2.0, generator=generators(SEEDS), num_inference_steps=STEPS,
                      output_type="np").images
    ours = predicted(folder, quantized, conditioning=ConditioningSpec(class_labels=labels, uncond_class_label=1000,
                                                                      guidance_scale=2.0))
    # DiTPipeline batches [cond, uncond], predict [uncond, cond]: equal up to float rounding
    torch.testing.assert_close(ours, torch.from_numpy(images), rtol=0, atol=1e-5)


def test_the_hubs_dit_layout_with_legacy_class_names_gives_its_dit_pipeline(tmp_path):
    # facebook/DiT-XL-2-256: model_index.json and transformer/config.json still say Transformer2DModel.
    import json

    from diffusers import DDIMScheduler, DiTPipeline

    from accuquant_pl.diffusion import ConditioningSpec
    from tests.tiny_models import tiny_dit

    folder = tmp_path / "dit"
    DiTPipeline(transformer=tiny_dit(channels=4, num_classes=1000, learned_sigma=True), vae=kl_vae(4),
                scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    for path, key in ((folder / "model_index.json", "transformer"), (folder / "transformer" / "config.json", None)):
        content = json.loads(path.read_text())
        if key is None:
            content["_class_name"] = "Transformer2DModel"
        else:
            content[key] = ["diffusers", "Transformer2DModel"]
        path.write_text(json.dumps(content))
    quantized = rtn_dit_export(folder, tmp_path / "q")
    pipe = quantized_pipeline(quantized)
    assert type(pipe) is DiTPipeline and type(pipe.transformer).__name__ == "DiTTransformer2DModel"
    with torch.no_grad():
        images = pipe(class_labels=[3, 7, 1], guidance_scale=2.0, generator=generators(SEEDS),
                      num_inference_steps=STEPS, output_type="np").images
    ours = predicted(folder, quantized, conditioning=ConditioningSpec(class_labels=[3, 7, 1], uncond_class_label=1000,
                                                                      guidance_scale=2.0))
    torch.testing.assert_close(ours, torch.from_numpy(images), rtol=0, atol=1e-5)


def rtn_dit_export(folder: Path, out: Path) -> Path:
    transformer = load_denoiser(folder)
    g = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(4, 4, 8, 8, generator=g), "timestep": torch.arange(4) * 25 + i,
                "class_labels": torch.tensor([0, 3, 7, 1000])} for i in range(4)]
    model = rtn_quantize(transformer, QuantSpec(weight_bits=8, act_bits=8), batches, 100)
    return export_quantized(model, out, scheduler_config=load_scheduler_config(folder), pretrained=str(folder))


def test_pixart_folder_gives_its_pipeline_whose_masked_prompt_images_equal_predict(tmp_path):
    # PixArt pads its T5 prompts and masks the padding out of cross-attention: tools/encode_prompts.py writes the
    # tokenizer's masks with the embeddings and predict gives them to the transformer as PixArtAlphaPipeline does.
    pytest.importorskip("transformers")
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    from tests.tiny_models import tiny_pixart, tiny_t5
    from tools.encode_prompts import main as encode_prompts

    encoder, tokenizer = tiny_t5()
    fp = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=kl_vae(4), transformer=tiny_pixart(),
                             scheduler=DDIMScheduler(num_train_timesteps=100))
    folder = tmp_path / "pixart"
    fp.save_pretrained(folder)
    quantized = rtn_pixart_export(folder, tmp_path / "q")
    pipe = quantized_pipeline(quantized)
    assert type(pipe) is PixArtAlphaPipeline and pipe.transformer is not fp.transformer
    prompts = ["a red car", "a photo of a cat", "dog"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    masked, unmasked = tmp_path / "masked.pt", tmp_path / "unmasked.pt"
    encode_prompts([str(folder), str(tmp_path / "prompts.txt"), "--out", str(masked), "--device", "cpu"])
    written = torch.load(masked, weights_only=True)
    assert 0 < int(written["cond_mask"].sum()) < written["cond_mask"].numel()  # padded prompts: the mask matters
    torch.save({"cond": written["cond"], "uncond": written["uncond"]}, unmasked)
    with torch.no_grad():
        images = pipe(prompt=prompts, negative_prompt="", guidance_scale=3.0, num_inference_steps=STEPS,
                      generator=generators(SEEDS), output_type="np", use_resolution_binning=False).images
    ours = predicted(folder, quantized, conditioning={"prompt_embeddings": str(masked), "guidance_scale": 3.0})
    torch.testing.assert_close(ours, torch.from_numpy(images), rtol=0, atol=1e-5)
    blind = predicted(folder, quantized, conditioning={"prompt_embeddings": str(unmasked), "guidance_scale": 3.0})
    assert (blind - torch.from_numpy(images)).abs().max() > 1e-3


def rtn_pixart_export(folder: Path, out: Path) -> Path:
    from tests.tiny_models import T5_TOKENS

    transformer = load_denoiser(folder)
    g = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(4, 4, 8, 8, generator=g), "timestep": torch.arange(4) * 25 + i,
                "encoder_hidden_states": torch.randn(4, T5_TOKENS, TEXT_DIM, generator=g)} for i in range(4)]
    model = rtn_quantize(transformer, QuantSpec(weight_bits=8, act_bits=8), batches, 100)
    return export_quantized(model, out, scheduler_config=load_scheduler_config(folder), pretrained=str(folder))


def test_a_1024px_pixart_gets_the_pipelines_size_conditions(tmp_path):
    # sample_size 128 (PixArt-XL-2-1024): PixArtAlphaPipeline adds the image size and aspect ratio to the timestep
    # embedding, from its VAE's 8x downsampling; predict's sampler must give the transformer the same.
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    from tests.tiny_models import TEXT_DIM, tiny_t5

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
                                           num_layers=1, sample_size=128, patch_size=8, cross_attention_dim=24,
                                           caption_channels=TEXT_DIM, norm_num_groups=1)
    assert transformer.use_additional_conditions
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=2,
                        layers_per_block=1)  # 8 pixels per latent, as SD's; never run (latents compared)
    encoder, tokenizer = tiny_t5()
    folder = tmp_path / "pixart1024"
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                        scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    cond, mask, uncond, uncond_mask = pipe.encode_prompt(["a red car"], True, negative_prompt="",
                                                         device=torch.device("cpu"))
    prompts = tmp_path / "p.pt"
    torch.save({"cond": cond, "cond_mask": mask, "uncond": uncond[0], "uncond_mask": uncond_mask[0]}, prompts)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond, prompt_attention_mask=mask, negative_prompt=None,
                      negative_prompt_embeds=uncond, negative_prompt_attention_mask=uncond_mask, guidance_scale=2.0,
                      num_inference_steps=3, generator=generators([4]), output_type="latent",
                      use_resolution_binning=False).images
        sampler = SampleGeneration(pretrained=str(folder), num_inference_steps=3, decode=False,
                                   conditioning={"prompt_embeddings": str(prompts), "guidance_scale": 2.0})
        ours = sampler.generate(torch.tensor([4]))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
