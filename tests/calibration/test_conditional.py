"""Conditional and latent calibration: class- and text-conditional UNets with classifier-free guidance, latent
diffusion with the autoencoder kept in FP, end to end through the CLI on tiny models, and the guided eps that
the trajectories and the AccuQuant rollout use checked against what diffusers' own pipelines compute.

Pipelines compared (run on the same tiny models, noises, conditions and DDIM schedule, with their
``scheduler.step`` hooked to record the eps it is given and the state it returns):
- text-conditional: ``StableDiffusionPipeline.__call__``'s denoising loop, reproduced line for line (diffusers'
  own pipeline needs ``transformers``, not a dependency here), and the real pipeline when it imports
  (``text_encoder=None``: prompts go in as ``prompt_embeds`` / ``negative_prompt_embeds``);
- class-conditional latent: ``DiTPipeline`` (cond-first batch, null class 1000) on a class-conditional UNet2DModel;
- unconditional latent: ``LDMPipeline`` with a VQModel (images decoded through its codebook).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, DiTPipeline, LDMPipeline
from torch.utils.data import default_collate

from accuquant_pl.calibration import objectives
from accuquant_pl.calibration.objectives import accuquant_step, per_step_loss
from accuquant_pl.cli import main
from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.diffusion import ConditioningSpec
from accuquant_pl.diffusion.conditioning import Conditioning
from accuquant_pl.diffusion.loading import load_denoiser, load_scheduler_config, load_vae
from accuquant_pl.diffusion.sampling import model_output, network_inputs
from accuquant_pl.evaluation.generation import SampleGeneration
from tests.conftest import REPO, quick_fit_args
from tests.tiny_models import (
    class_conditional_unet,
    kl_vae,
    model_folder,
    rgb_unet,
    save_pipeline,
    save_text_encoder,
    text_conditional_unet,
    vq_vae,
    write_prompts,
)

STEPS = 6
GUIDANCE = 3.0


# ------------------------------------------------------------------------------------------------- helpers


def _nest_conditioning(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with its ConditioningSpec fields moved under ``conditioning`` (as the configs write them)."""
    cond = {k: args[k] for k in args if k in ConditioningSpec.__dataclass_fields__}
    rest = {k: v for k, v in args.items() if k not in cond}
    return {**rest, "conditioning": cond} if cond else rest


def calibration_args(tmp_path: Path, config: str, folder: Path, name: str, data: dict[str, Any],
                     **model: Any) -> list[str]:
    # The digits AccuQuant config's final stage is off: these runs test conditioning.
    return quick_fit_args(tmp_path, config, folder, name, {"final_stage": None, **model},
                          {"num_inference_steps": STEPS, "sampling_batch_size": 4, **_nest_conditioning(data)})


def predict(tmp_path: Path, folder: Path, name: str, num_samples: int = 3, **model: Any) -> np.ndarray:
    out = tmp_path / name
    args = ["predict", "--config", str(REPO / "configs" / "sample_digits.yaml"),
            "--model.init_args.pretrained", str(folder), "--model.init_args.num_inference_steps", str(STEPS),
            "--data.init_args.num_samples", str(num_samples), "--data.init_args.batch_size", "2",
            "--trainer.callbacks.init_args.output_dir", str(out), "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path)]
    for key, value in model.items():
        key = f"conditioning.{key}" if key in ConditioningSpec.__dataclass_fields__ else key
        args += [f"--model.init_args.{key}", value if isinstance(value, str) else yaml.safe_dump(value).strip()]
    main(args)
    return np.load(out / "samples.npz")["images"]


class StepRecorder:
    """Wraps a scheduler's ``step``: records the model output it is given and the state it returns."""

    def __init__(self, scheduler: Any) -> None:
        self.eps: list[torch.Tensor] = []
        self.states: list[torch.Tensor] = []
        real = scheduler.step

        def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = real(model_output, timestep, sample, *args, **kwargs)
            prev = out.prev_sample if hasattr(out, "prev_sample") else out[0]
            self.eps.append(model_output.detach().clone())
            self.states.append(prev.detach().clone())
            return out

        scheduler.step = step


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def data_module(tmp_path: Path, folder: Path, group_size: int, **cond: Any) -> TrajectoryDataModule:
    dm = TrajectoryDataModule(pretrained=str(folder), scheduler="ddim", num_inference_steps=STEPS, num_trajectories=2,
                              batch_size=2, group_size=group_size, cache_dir=str(tmp_path / "cache"),
                              conditioning=ConditioningSpec(**cond) if cond else None)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def group_batch(dm: TrajectoryDataModule, start: int) -> dict[str, Any]:
    """Both trajectories' items that start at schedule step ``start``."""
    starts = dm.train_set.starts
    return default_collate([dm.train_set[i * len(starts) + starts.index(start)] for i in range(2)])


def rollout_eps(monkeypatch, dm: TrajectoryDataModule, batch: dict[str, Any]) -> list[torch.Tensor]:
    """The eps the AccuQuant rollout feeds the sampler at each step of a group, with the FP model as student."""
    seen: list[torch.Tensor] = []
    real = objectives.rollout

    def spy(gradient, network, steps, x, targets, reduction, scale, recompute=True):
        def recorded(j: int, x: torch.Tensor) -> torch.Tensor:
            out = network(j, x)
            seen.append(out.detach().clone())
            return out
        return real(gradient, recorded, steps, x, targets, reduction, scale, recompute)

    monkeypatch.setattr(objectives, "rollout", spy)
    student = copy.deepcopy(load_denoiser(dm.model_path)).requires_grad_(True)  # the exact mode calls backward
    loss = accuquant_step(student, dm.make_scheduler(), batch, dm.conditioning(batch), "exact", "mean")
    # The FP model rolled out from the FP state meets the FP target.
    assert float(loss) < 1e-10
    return seen


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    err = float((a - b).abs().max())
    assert err <= atol, f"{what}: max abs difference {err:.3g} > {atol}"


# ------------------------------------------------------------------------------- conditioning building blocks


def test_network_inputs_double_the_batch_under_guidance():
    unet = text_conditional_unet().eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([40, 40])
    cond = Conditioning(encoder_hidden_states=torch.randn(2, 5, 16), uncond_encoder_hidden_states=torch.zeros(2, 5, 16),
                        guidance_scale=GUIDANCE)
    inputs = network_inputs(unet, x, t, cond)
    assert inputs["sample"].shape[0] == 4 and inputs["timestep"].tolist() == [40] * 4
    assert torch.equal(inputs["encoder_hidden_states"][:2], cond.uncond_encoder_hidden_states)
    with torch.no_grad():
        e_u = unet(x, t, encoder_hidden_states=cond.uncond_encoder_hidden_states).sample
        e_c = unet(x, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        assert_close(model_output(unet, x, t, cond), e_u + GUIDANCE * (e_c - e_u), "guided eps")
    assert network_inputs(unet, x, t, Conditioning(encoder_hidden_states=cond.encoder_hidden_states))["sample"] is x


def test_class_only_condition_model_gets_no_encoder_states():
    unet = class_conditional_unet().eval()
    x = torch.randn(2, 3, 8, 8)
    cond = Conditioning(class_labels=torch.tensor([1, 2]), uncond_class_labels=torch.tensor([10, 10]),
                        guidance_scale=GUIDANCE)
    with torch.no_grad():
        e_u = unet(x, 7, None, class_labels=cond.uncond_class_labels).sample
        e_c = unet(x, 7, None, class_labels=cond.class_labels).sample
        assert_close(model_output(unet, x, 7, cond), e_u + GUIDANCE * (e_c - e_u), "guided eps")


def test_per_step_loss_reconstructs_both_halves_of_the_guided_batch():
    teacher = text_conditional_unet().eval()
    student = copy.deepcopy(teacher)
    sizes: list[int] = []
    block = student.down_blocks[0].attentions[0]
    block.register_forward_hook(lambda m, args, kwargs_out: sizes.append(args[0].shape[0]))
    batch = {"x": torch.randn(2, 4, 8, 8), "timesteps": torch.tensor([[40], [40]])}
    cond = Conditioning(encoder_hidden_states=torch.randn(2, 5, 16), uncond_encoder_hidden_states=torch.zeros(2, 5, 16),
                        guidance_scale=GUIDANCE)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(25)  # its schedule holds t = 40
    loss = per_step_loss(student, teacher, block, teacher.down_blocks[0].attentions[0], sched, batch, cond, "mean")
    assert sizes == [4] and float(loss) == 0.0


# ------------------------------------------------------------------------------- end-to-end calibration (CLI)


@pytest.mark.parametrize("objective", ["accuquant", "per_step"])
def test_class_conditional_calibrates_and_samples(tmp_path, objective):
    folder = model_folder("class", tmp_path)
    config = "digits_w4a8_accuquant.yaml" if objective == "accuquant" else "digits_w4a8_qdiff.yaml"
    cli = main(calibration_args(tmp_path, config, folder, "run", {
        "class_labels": [0, 3, 7], "uncond_class_label": 10, "guidance_scale": GUIDANCE,
        "group_size": 2 if objective == "accuquant" else 1}))
    assert len(cli.model.done_units) == len(cli.model.unit_names)
    assert "class_embedding" in cli.model.unit_names
    cond = {"class_labels": [0, 3, 7], "uncond_class_label": "10", "guidance_scale": str(GUIDANCE)}
    images = predict(tmp_path, folder, "q", quantized=str(tmp_path / "run" / "quantized"), **cond)
    fp = predict(tmp_path, folder, "fp", **cond)
    assert images.shape == fp.shape == (3, 3, 8, 8)
    assert np.isfinite(images).all() and not np.array_equal(images, fp)


@pytest.mark.parametrize("objective", ["accuquant", "per_step"])
def test_text_conditional_latent_calibrates_and_decodes(tmp_path, objective):
    folder = model_folder("t2i", tmp_path)
    prompts = str(tmp_path / "prompts.pt")
    cli = main(calibration_args(tmp_path, "t2i_w8a8_accuquant.yaml", folder, "run", {
        "prompt_embeddings": prompts, "guidance_scale": GUIDANCE, "group_size": 2 if objective == "accuquant" else 1},
        objective=objective,
        # the config's rollout options belong to AccuQuant: the per-step run leaves them out
        **({} if objective == "accuquant" else {"rollout_target": None, "gradient": None})))
    assert len(cli.model.done_units) == len(cli.model.unit_names)
    quantized = str(tmp_path / "run" / "quantized")
    images = predict(tmp_path, folder, "q", quantized=quantized, prompt_embeddings=prompts,
                     guidance_scale=str(GUIDANCE))
    assert images.shape == (3, 3, 16, 16), "latents 4x8x8 decode to 3x16x16 images through vae/"
    latents = predict(tmp_path, folder, "latents", quantized=quantized, prompt_embeddings=prompts,
                      guidance_scale=str(GUIDANCE), decode="false")
    assert latents.shape == (3, 4, 8, 8)


def test_latent_model_calibrates_in_latent_space_and_decodes(tmp_path):
    folder = model_folder("ldm", tmp_path)
    cli = main(calibration_args(tmp_path, "ldm_w4a8_accuquant.yaml", folder, "run", {"group_size": 3}))
    assert len(cli.model.done_units) == len(cli.model.unit_names)
    cached = cli.datamodule.tensors["states"]
    assert cached.shape[-3:] == (3, 8, 8), "trajectories live in the UNet's latent space"
    images = predict(tmp_path, folder, "q", quantized=str(tmp_path / "run" / "quantized"))
    assert images.shape == (3, 3, 16, 16)


# --------------------------------------------------------------------- the pipelines' own guided eps and states


def stable_diffusion_loop(unet, scheduler, prompt_embeds, negative_prompt_embeds, latents, num_inference_steps,
                          guidance_scale, eta=0.0):
    """StableDiffusionPipeline.__call__'s denoising loop (diffusers 0.42), with prompt embeddings given and
    guidance_rescale 0, line for line: the latents scaled by init_noise_sigma, [negative, positive] embeddings,
    the latent batch doubled *before* scale_model_input, one forward, chunk(2), uncond + s (text - uncond)."""
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    do_classifier_free_guidance = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
    if do_classifier_free_guidance:
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
    with torch.no_grad():
        for t in scheduler.timesteps:
            latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, timestep_cond=None,
                              cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False)[0]
            if do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, eta=eta, return_dict=False)[0]
    return latents


def real_stable_diffusion(unet, vae, scheduler, prompt_embeds, negative_prompt_embeds, seeds, output_type):
    try:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    except ImportError:
        pytest.skip("diffusers' StableDiffusionPipeline needs transformers (not installed); the reproduced loop ran")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators(seeds),
                output_type=output_type).images


def check_against_pipeline(monkeypatch, dm: TrajectoryDataModule, recorder: StepRecorder, start: int) -> None:
    """Cache (states, guided model outputs) and the rollout's eps equal what the pipeline's sampler stepped on."""
    states, outputs = dm.tensors["states"], dm.tensors["model_outputs"]  # (N, S+1, ...), (N, S, ...)
    assert len(recorder.eps) == STEPS
    for k in range(STEPS):
        assert_close(outputs[:, k], recorder.eps[k], f"cached guided eps at step {k}")
        assert_close(states[:, k + 1], recorder.states[k], f"cached state after step {k}")
    n = dm.group_size
    eps = rollout_eps(monkeypatch, dm, group_batch(dm, start))
    assert len(eps) == n
    for j in range(n):
        assert_close(eps[j], recorder.eps[start + j], f"rollout eps at step {start + j}")


@pytest.mark.parametrize("pipeline", ["reproduced", "diffusers"])
def test_text_guided_rollout_eps_equals_stable_diffusion(tmp_path, monkeypatch, pipeline):
    folder = save_pipeline(tmp_path / "sd", text_conditional_unet(), kl_vae(4), "vae", scheduler="sd")
    prompts_file = write_prompts(tmp_path / "prompts.pt", num_prompts=2)
    dm = data_module(tmp_path, folder, group_size=3, prompt_embeddings=str(prompts_file), guidance_scale=GUIDANCE)
    prompts = torch.load(prompts_file, weights_only=True)
    cond, uncond = prompts["cond"], prompts["uncond"].expand_as(prompts["cond"])  # trajectory i: prompt i % 2
    unet, vae = load_denoiser(folder), load_vae(folder)
    scheduler = DDIMScheduler.from_config(load_scheduler_config(folder))
    recorder = StepRecorder(scheduler)
    seeds = [0, 1]  # the data module's seed + i
    if pipeline == "reproduced":
        noise = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in generators(seeds)])
        stable_diffusion_loop(unet, scheduler, cond, uncond, noise, STEPS, GUIDANCE)
    else:
        real_stable_diffusion(unet, vae, scheduler, cond, uncond, seeds, "latent")
    check_against_pipeline(monkeypatch, dm, recorder, start=2)
    if pipeline == "diffusers":  # decoded images: predict's VAE decoding equals the pipeline's
        images = real_stable_diffusion(unet, vae, DDIMScheduler.from_config(load_scheduler_config(folder)), cond,
                                       uncond, seeds, "pt")
        sampler = SampleGeneration(pretrained=str(folder), num_inference_steps=STEPS, conditioning=ConditioningSpec(
            prompt_embeddings=str(prompts_file), guidance_scale=GUIDANCE))
        ours = (sampler.predict_step(torch.tensor(seeds), 0) + 1) / 2
        assert_close(ours, images, "decoded images")


def test_class_guided_rollout_eps_equals_dit_pipeline(tmp_path, monkeypatch):
    # A class-conditional latent UNet; DiT's null class is 1000, so 1001 class embeddings.
    folder = save_pipeline(tmp_path / "cls", rgb_unet(channels=4, num_class_embeds=1001), kl_vae(4), "vae",
                           scheduler="ddim")
    labels = [3, 8]
    dm = data_module(tmp_path, folder, group_size=2, class_labels=labels, uncond_class_label=1000,
                     guidance_scale=GUIDANCE)
    unet, vae = load_denoiser(folder), load_vae(folder)
    scheduler = DDIMScheduler.from_config(load_scheduler_config(folder))
    pipe = DiTPipeline(transformer=unet, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    recorder = StepRecorder(pipe.scheduler)
    with torch.no_grad():
        images = pipe(class_labels=labels, guidance_scale=GUIDANCE, generator=generators([0, 1]),
                      num_inference_steps=STEPS, output_type="pt").images
    # DiT steps the doubled batch [cond, uncond] with the guided eps in both halves: keep the first half.
    recorder.eps = [e.chunk(2)[0] for e in recorder.eps]
    recorder.states = [s.chunk(2)[0] for s in recorder.states]
    check_against_pipeline(monkeypatch, dm, recorder, start=STEPS - 2)
    sampler = SampleGeneration(pretrained=str(folder), num_inference_steps=STEPS, conditioning=ConditioningSpec(
        class_labels=labels, uncond_class_label=1000, guidance_scale=GUIDANCE))
    ours = (sampler.predict_step(torch.tensor([0, 1]), 0) + 1) / 2
    assert_close(ours, images, "decoded images")


def test_latent_predict_decodes_like_ldm_pipeline(tmp_path):
    folder = save_pipeline(tmp_path / "ldm", rgb_unet(channels=3), vq_vae(3), "vqvae", scheduler="ddim")
    pipe = LDMPipeline(vqvae=load_vae(folder), unet=load_denoiser(folder),
                       scheduler=DDIMScheduler.from_config(load_scheduler_config(folder)))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(batch_size=3, generator=generators([0, 1, 2]), num_inference_steps=STEPS, eta=0.0,
                      output_type="np").images  # (B, H, W, C) in [0, 1]
    sampler = SampleGeneration(pretrained=str(folder), num_inference_steps=STEPS)
    assert sampler.vae is not None
    ours = (sampler.predict_step(torch.tensor([0, 1, 2]), 0) + 1) / 2
    assert_close(ours.permute(0, 2, 3, 1), torch.from_numpy(theirs), "decoded images")


def test_encode_prompts_tool_matches_stable_diffusion_encode_prompt(tmp_path):
    """tools/encode_prompts.py writes what StableDiffusionPipeline.encode_prompt computes (tiny CLIP, own vocab)."""
    pytest.importorskip("transformers")
    try:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    except ImportError:
        pytest.skip("StableDiffusionPipeline does not import")
    from tools.encode_prompts import main as encode_main

    folder = save_pipeline(tmp_path / "sd", text_conditional_unet(), kl_vae(4), "vae", scheduler="sd")
    encoder, tokenizer = save_text_encoder(folder)
    prompts = ["a photo of a cat", "red car", "a dog"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    encode_main([str(folder), str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "p.pt"), "--device", "cpu"])
    written = torch.load(tmp_path / "p.pt", weights_only=True)
    pipe = StableDiffusionPipeline(vae=load_vae(folder), text_encoder=encoder, tokenizer=tokenizer,
                                   unet=load_denoiser(folder), scheduler=DDIMScheduler.from_config(load_scheduler_config(folder)),
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    cond, uncond = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True, negative_prompt=[""] * 3)
    assert_close(written["cond"], cond, "prompt embeddings", atol=1e-6)
    assert_close(written["uncond"].expand_as(uncond), uncond, "negative prompt embeddings", atol=1e-6)
    assert written["prompts"] == prompts
    # The file feeds the trajectories directly.
    dm = data_module(tmp_path, folder, group_size=2, prompt_embeddings=str(tmp_path / "p.pt"), guidance_scale=GUIDANCE)
    assert dm.tensors["states"].shape[:2] == (2, STEPS + 1) and dm.tensors["prompt_index"].tolist() == [0, 1]
