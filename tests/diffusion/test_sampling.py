import torch
from diffusers import DDIMScheduler, DDPMScheduler

from accuquant_pl.diffusion.conditioning import Conditioning
from accuquant_pl.diffusion.sampling import initial_noise, model_output, sample
from tests.conftest import tiny_unet


def test_initial_noise_rows_do_not_depend_on_batch():
    full = initial_noise([0, 1, 2, 3], (1, 8, 8))
    part = initial_noise([2, 3], (1, 8, 8))
    assert torch.equal(full[2:], part)
    assert not torch.equal(full[0], full[1])


def test_sampling_is_deterministic_and_trajectory_is_consistent():
    unet = tiny_unet().eval()
    sched = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=100).config)
    noise = initial_noise([0, 1], (1, 8, 8))
    traj = sample(unet, sched, noise, 5, keep_trajectory=True, keep_model_outputs=True)
    final = sample(unet, sched, noise, 5)
    assert traj.states.shape == (6, 2, 1, 8, 8) and traj.model_outputs.shape == (5, 2, 1, 8, 8)
    assert torch.equal(traj.states[0], noise) and torch.equal(traj.states[-1], final)
    # Replaying one step from the stored state and output gives the next stored state.
    sched.set_timesteps(5)
    k = 2
    nxt = sched.step(traj.model_outputs[k], traj.timesteps[k], traj.states[k]).prev_sample
    assert torch.allclose(nxt, traj.states[k + 1], atol=1e-6)


def test_guidance_combines_conditional_and_unconditional():
    torch.manual_seed(0)
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=11).eval()
    x = torch.randn(2, 1, 8, 8)
    cond = Conditioning(class_labels=torch.tensor([3, 5]), uncond_class_labels=torch.tensor([10, 10]),
                        guidance_scale=3.0)
    with torch.no_grad():
        got = model_output(unet, x, 7, cond)
        e_c = unet(x, 7, class_labels=cond.class_labels).sample
        e_u = unet(x, 7, class_labels=cond.uncond_class_labels).sample
    assert torch.allclose(got, e_u + 3.0 * (e_c - e_u), atol=1e-5)


def test_pixart_size_conditions_are_the_pipelines():
    # The 1024-px PixArt-alpha takes the image size as micro-conditions; PixArtAlphaPipeline gives its default
    # size, sample_size x 8 pixels per latent (SD's VAE), per sample and doubled with the guided batch.
    from tests.tiny_models import PROMPT_TOKENS, TEXT_DIM, tiny_pixart

    model = tiny_pixart(size_conditions=True).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = torch.randn(2, PROMPT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    cond = Conditioning(encoder_hidden_states=prompts, guidance_scale=2.0,
                        uncond_encoder_hidden_states=torch.zeros_like(prompts))
    with torch.no_grad():
        ours = model_output(model, x, 500, cond)

        def guided(height: int, width: int) -> torch.Tensor:
            sizes = {"resolution": torch.tensor([[float(height), float(width)]] * 4),
                     "aspect_ratio": torch.tensor([[height / width]] * 4)}
            out = model(torch.cat([x, x]), encoder_hidden_states=torch.cat([torch.zeros_like(prompts), prompts]),
                        timestep=torch.tensor([500] * 4), added_cond_kwargs=sizes).sample[:, :4]
            return out[:2] + 2.0 * (out[2:] - out[:2])

        assert torch.allclose(ours, guided(64, 64), atol=1e-6)
        assert not torch.allclose(ours, guided(128, 64), atol=1e-3)  # the conditions reach the output


def test_prompt_masks_join_the_guided_batch_in_its_order_and_only_for_pixart():
    import pytest

    from accuquant_pl.diffusion.sampling import network_inputs
    from tests.tiny_models import PROMPT_TOKENS, TEXT_DIM, text_conditional_unet, tiny_pixart

    prompts = torch.randn(2, PROMPT_TOKENS, TEXT_DIM)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    uncond_mask = torch.tensor([[1, 0, 0, 0, 0]] * 2)
    cond = Conditioning(encoder_hidden_states=prompts, uncond_encoder_hidden_states=torch.zeros_like(prompts),
                        encoder_attention_mask=mask, uncond_encoder_attention_mask=uncond_mask, guidance_scale=2.0)
    inputs = network_inputs(tiny_pixart(), torch.randn(2, 4, 8, 8), 10, cond)
    assert torch.equal(inputs["encoder_attention_mask"], torch.cat([uncond_mask, mask]))
    assert torch.equal(inputs["encoder_hidden_states"][2:], prompts)
    with pytest.raises(ValueError, match="for PixArt; UNet2DConditionModel's pipeline does not mask"):
        network_inputs(text_conditional_unet(), torch.randn(2, 1, 8, 8), 10, cond)
    unmasked = Conditioning(encoder_hidden_states=prompts)
    with pytest.warns(UserWarning, match="PixArt prompts without attention masks"):
        network_inputs(tiny_pixart(), torch.randn(2, 4, 8, 8), 10, unmasked)
