"""Encode calibration prompts with a pipeline's own text encoder, once, into the prompt-embedding file that
``TrajectoryDataModule(prompt_embeddings=...)`` and ``SampleGeneration`` read:
``{'cond': (P, L, D), 'uncond': (L, D), 'prompts': [...]}``, and for PixArt also ``'cond_mask': (P, L)`` and
``'uncond_mask': (L,)``.

Stable-Diffusion-class folders: StableDiffusionPipeline.encode_prompt's encoding (no clip_skip): the tokenizer
pads / truncates every prompt to ``model_max_length`` tokens, the text encoder's last hidden state is the
embedding. PixArt folders (``model_index.json`` naming a PixArt pipeline): the pipeline's own ``encode_prompt``
(T5, padded to its ``max_sequence_length``), with the attention masks the transformer is given. ``uncond`` is
the negative prompt's (empty by default), as the pipeline uses it for classifier-free guidance. Needs
``transformers`` (the ``pipelines`` extra) and a local pipeline folder with tokenizer/ and text_encoder/; nothing
is downloaded.

    python tools/encode_prompts.py path/to/sd-folder prompts.txt --out data/prompts.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def _pipeline_class(folder: Path) -> str:
    index = folder / "model_index.json"
    return json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""


@torch.no_grad()
def encode(folder: Path, prompts: list[str], negative: str = "", device: str = "cpu",
           batch_size: int = 64, clean_caption: bool = True) -> dict[str, object]:
    if _pipeline_class(folder).startswith("PixArt"):
        return _encode_pixart(folder, prompts, negative, device, batch_size, clean_caption)
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").to(device).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        mask = ids.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
        return encoder(ids.input_ids.to(device), attention_mask=mask)[0].float().cpu()

    cond = torch.cat([embed(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)])
    return {"cond": cond, "uncond": embed([negative])[0], "prompts": prompts}


def _encode_pixart(folder: Path, prompts: list[str], negative: str, device: str, batch_size: int,
                   clean_caption: bool) -> dict[str, object]:
    from diffusers import DiffusionPipeline

    # Only the tokenizer and the text encoder are needed: the transformer and the autoencoder are not loaded.
    pipe = DiffusionPipeline.from_pretrained(folder, transformer=None, vae=None).to(device)

    def embed(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cond, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=torch.device(device),
                                              clean_caption=clean_caption)
        return cond.float().cpu(), mask.cpu()

    parts = [embed(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    # The pipeline encodes the negative prompt exactly as a prompt (same padding, same caption cleaning).
    uncond, uncond_mask = embed([negative])
    return {"cond": torch.cat([c for c, _ in parts]), "cond_mask": torch.cat([m for _, m in parts]),
            "uncond": uncond[0], "uncond_mask": uncond_mask[0], "prompts": prompts}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="pipeline folder with tokenizer/ and text_encoder/")
    ap.add_argument("prompts", type=Path, help="text file, one prompt per line (blank lines skipped)")
    ap.add_argument("--out", type=Path, required=True, help="output .pt file")
    ap.add_argument("--negative", default="", help="negative prompt for the unconditional branch (default: empty)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-clean-caption", dest="clean_caption", action="store_false",
                    help="PixArt: encode the prompts as written (the pipeline's clean_caption=False; by default they "
                         "are cleaned as PixArtAlphaPipeline does, when bs4 and ftfy are installed)")
    args = ap.parse_args(argv)
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not prompts:
        ap.error(f"{args.prompts} holds no prompt")
    result = encode(args.folder, prompts, args.negative, args.device, clean_caption=args.clean_caption)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    print(f"wrote {len(prompts)} prompt embeddings {tuple(result['cond'].shape)} and the negative prompt's to {args.out}")


if __name__ == "__main__":
    main()
