"""Encode calibration prompts with a Stable-Diffusion-class pipeline's own text encoder, once, into the
prompt-embedding file that ``TrajectoryDataModule(prompt_embeddings=...)`` and ``DiffusionSampler`` read:
``{'cond': (P, L, D), 'uncond': (L, D), 'prompts': [...]}``.

The encoding is StableDiffusionPipeline.encode_prompt's (no clip_skip): the tokenizer pads / truncates every
prompt to ``model_max_length`` tokens, the text encoder's last hidden state is the embedding; ``uncond`` is the
negative prompt's (empty by default), as the pipeline uses it for classifier-free guidance. Needs ``transformers``
(not a dependency of accuquant-pl: install it where you run this) and a local pipeline folder with tokenizer/ and
text_encoder/; nothing is downloaded.

    python tools/encode_prompts.py path/to/sd-folder prompts.txt --out data/prompts.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


@torch.no_grad()
def encode(folder: Path, prompts: list[str], negative: str = "", device: str = "cpu",
           batch_size: int = 64) -> dict[str, object]:
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="pipeline folder with tokenizer/ and text_encoder/")
    ap.add_argument("prompts", type=Path, help="text file, one prompt per line (blank lines skipped)")
    ap.add_argument("--out", type=Path, required=True, help="output .pt file")
    ap.add_argument("--negative", default="", help="negative prompt for the unconditional branch (default: empty)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not prompts:
        ap.error(f"{args.prompts} holds no prompt")
    result = encode(args.folder, prompts, args.negative, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    print(f"wrote {len(prompts)} prompt embeddings {tuple(result['cond'].shape)} and the negative prompt's to {args.out}")


if __name__ == "__main__":
    main()
