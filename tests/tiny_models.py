"""Tiny random diffusers models of the classes the shipped configs expect, saved as local pipeline folders.

Conditional and latent counterparts of ``tests/conftest.py``'s ``tiny_unet``: pixel-space RGB (the CIFAR-10 DDPM
layout), latent (UNet2DModel + VQModel in vqvae/, the LDM layout, or AutoencoderKL in vae/), class-conditional
and text-conditional UNet2DConditionModel, and prompt-embedding files. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel, VQModel
from torch import nn

TEXT_DIM = 16  # cross-attention width of the tiny text-conditional UNet (the "text encoder" output size)
PROMPT_TOKENS = 5


def rgb_unet(sample_size: int = 8, channels: int = 3, seed: int = 0, num_class_embeds: int | None = None) -> UNet2DModel:
    """UNet2DModel with one attention level (google/ddpm-cifar10-32's block types, in miniature)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds,
    )


def class_conditional_unet(num_classes: int = 11, channels: int = 3, seed: int = 0) -> UNet2DConditionModel:
    """UNet2DConditionModel conditioned on class labels only (class embedding, no cross-attention)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
        num_class_embeds=num_classes,
    )


def text_conditional_unet(channels: int = 4, seed: int = 0) -> UNet2DConditionModel:
    """UNet2DConditionModel with cross-attention on prompt embeddings (Stable Diffusion's block types)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=TEXT_DIM, norm_num_groups=4, attention_head_dim=4,
    )


def kl_vae(latent_channels: int = 4, seed: int = 1) -> AutoencoderKL:
    """AutoencoderKL, factor 2 (8x8 latents <-> 16x16 RGB), Stable Diffusion's scaling factor."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1, sample_size=16,
        scaling_factor=0.18215,
    )


def vq_vae(latent_channels: int = 3, seed: int = 1) -> VQModel:
    """VQModel, factor 2, a 32-entry codebook (the LDM-4 autoencoder's type)."""
    torch.manual_seed(seed)
    return VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=latent_channels, num_vq_embeddings=32, vq_embed_dim=latent_channels, norm_num_groups=4,
        layers_per_block=1, sample_size=16,
    )


# Stable Diffusion v1.x's scheduler settings (StableDiffusionPipeline rewrites other steps_offset / clip_sample).
SD_SCHEDULER = {"steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012}


def save_pipeline(folder: Path, unet: nn.Module, vae: nn.Module | None = None, vae_name: str = "vae",
                  scheduler: str = "ddpm") -> Path:
    """A pipeline folder as save_pretrained writes it: unet/, scheduler/ and, for a latent model, vae/ or vqvae/.
    ``scheduler``: 'ddpm', 'ddim' (defaults, 100 training steps) or 'sd' (DDIM with Stable Diffusion's settings)."""
    unet.save_pretrained(folder / "unet")
    if scheduler == "sd":
        sched = DDIMScheduler(num_train_timesteps=100, **SD_SCHEDULER)
    else:
        sched = (DDPMScheduler if scheduler == "ddpm" else DDIMScheduler)(num_train_timesteps=100)
    sched.save_pretrained(folder / "scheduler")
    if vae is not None:
        vae.save_pretrained(folder / vae_name)
    return folder


def write_prompts(path: Path, num_prompts: int = 3, seed: int = 2, masks: bool = False) -> Path:
    """A prompt-embedding file {'cond': (P, L, D), 'uncond': (L, D)} for ``text_conditional_unet``; ``masks``: with
    attention masks of prompts padded after 1 + i % L tokens (the negative prompt after one), as PixArt's."""
    gen = torch.Generator().manual_seed(seed)
    content = {"cond": torch.randn(num_prompts, PROMPT_TOKENS, TEXT_DIM, generator=gen),
               "uncond": torch.randn(PROMPT_TOKENS, TEXT_DIM, generator=gen)}
    if masks:
        positions = torch.arange(PROMPT_TOKENS)
        content["cond_mask"] = torch.stack([(positions <= i % PROMPT_TOKENS).long() for i in range(num_prompts)])
        content["uncond_mask"] = (positions == 0).long()
    torch.save(content, path)
    return path


def model_folder(kind: str, root: Path) -> Path:
    """A tiny folder of the layout a config family expects: 'digits', 'cifar10', 'ldm', 't2i', 'class', 'dit'."""
    folder = root / f"tiny-{kind}"
    if folder.exists():
        return folder
    if kind == "digits":
        from tests.conftest import tiny_unet

        return save_pipeline(folder, tiny_unet())
    if kind == "cifar10":
        return save_pipeline(folder, rgb_unet())
    if kind == "ldm":
        return save_pipeline(folder, rgb_unet(channels=3), vq_vae(3), "vqvae", scheduler="ddim")
    if kind == "t2i":
        write_prompts(root / "prompts.pt")
        return save_pipeline(folder, text_conditional_unet(), kl_vae(4), "vae", scheduler="sd")
    if kind == "class":
        return save_pipeline(folder, class_conditional_unet())
    if kind == "dit":  # the digits DiT teacher's layout: transformer/ + scheduler/, 10 classes, 1 channel
        return save_transformer_folder(folder, tiny_dit())
    raise ValueError(f"unknown tiny model kind {kind!r}")


def save_text_encoder(folder: Path, seed: int = 0) -> tuple[nn.Module, object]:
    """A tiny CLIP text encoder (width TEXT_DIM) and a word-level CLIP tokenizer with its own vocabulary, saved as
    ``text_encoder/`` and ``tokenizer/`` of a Stable Diffusion layout folder (needs transformers)."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in ("a", "photo", "of", "cat", "red", "car"):
        vocab[f"{word}</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(f"{ch}</w>", len(vocab))
    files = folder.parent / f"{folder.name}-vocab"
    files.mkdir(parents=True, exist_ok=True)
    (files / "vocab.json").write_text(json.dumps(vocab))
    (files / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=PROMPT_TOKENS)
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           max_position_embeddings=PROMPT_TOKENS, bos_token_id=0, eos_token_id=1,
                                           pad_token_id=1)).eval()
    encoder.save_pretrained(folder / "text_encoder")
    return encoder, tokenizer


def tiny_dit(sample_size: int = 8, channels: int = 1, num_classes: int = 10, learned_sigma: bool = False,
             seed: int = 0) -> nn.Module:
    """DiTTransformer2DModel: 2 blocks, width 16, patch 2, class-conditional (adaLN-Zero; null class =
    num_classes); ``learned_sigma``: twice the input channels out, as facebook/DiT-XL-2 predicts a variance."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=channels,
        out_channels=2 * channels if learned_sigma else channels, num_layers=2, sample_size=sample_size,
        patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=1,
    )


def tiny_pixart(channels: int = 4, seed: int = 0, size_conditions: bool = False) -> nn.Module:
    """PixArtTransformer2DModel: 2 blocks, width 16 (24 with size conditions), cross-attention on TEXT_DIM prompt
    embeddings, learned sigma;
    ``size_conditions``: resolution and aspect-ratio micro-conditions, as the 1024-px PixArt-alpha has."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    head_dim = 12 if size_conditions else 8  # the size embeddings split the width in thirds
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=channels, out_channels=2 * channels,
        num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=2 * head_dim, caption_channels=TEXT_DIM,
        norm_num_groups=1, use_additional_conditions=size_conditions,
    )


def save_transformer_folder(folder: Path, transformer: nn.Module, vae: nn.Module | None = None,
                            scheduler: str = "ddpm") -> Path:
    """A pipeline folder with ``transformer/``, ``scheduler/`` and, for a latent model, ``vae/``."""
    transformer.save_pretrained(folder / "transformer")
    (DDPMScheduler if scheduler == "ddpm" else DDIMScheduler)(num_train_timesteps=100).save_pretrained(
        folder / "scheduler")
    if vae is not None:
        vae.save_pretrained(folder / "vae")
    return folder


T5_TOKENS = 12  # the tiny T5 prompts' padded length (PixArt pads to 120)


def tiny_t5(seed: int = 0) -> tuple[nn.Module, object]:
    """A tiny T5 encoder (width TEXT_DIM) and a word-level tokenizer that pads with 0 and ends prompts with
    ``</s>``, as PixArt's T5 does (needs transformers and tokenizers; built here, nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat", "red", "car", "dog"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=T5_TOKENS)
    torch.manual_seed(seed)
    encoder = T5EncoderModel(T5Config(vocab_size=len(words), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    return encoder, tokenizer
