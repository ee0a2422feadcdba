"""What a conditional denoiser is told besides (x, t): class labels or prompt embeddings, and the classifier-free
guidance to apply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """What a conditional UNet is told besides (x, t), and the classifier-free guidance to apply."""

    class_labels: Tensor | None = None
    encoder_hidden_states: Tensor | None = None
    guidance_scale: float = 1.0
    """Classifier-free guidance weight s: eps = eps_u + s (eps_c - eps_u); 1.0 means no guidance."""
    uncond_class_labels: Tensor | None = None
    uncond_encoder_hidden_states: Tensor | None = None

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def kwargs(self, uncond: bool = False) -> dict[str, Tensor]:
        labels = self.uncond_class_labels if uncond else self.class_labels
        states = self.uncond_encoder_hidden_states if uncond else self.encoder_hidden_states
        out: dict[str, Tensor] = {}
        if labels is not None:
            out["class_labels"] = labels
        if states is not None:
            out["encoder_hidden_states"] = states
        return out

    def to(self, device: torch.device) -> Conditioning:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return Conditioning(**moved)


def load_prompt_embeddings(path: str | Path) -> dict[str, Tensor]:
    """A prompt-embedding file: ``{'cond': (P, L, D), 'uncond': (L, D)}`` (the text encoder's outputs for P
    prompts and for the empty / negative prompt), as ``TrajectoryDataModule.prompt_embeddings`` reads it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt_embeddings file {str(path)!r} does not exist")
    prompts = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(prompts, dict) or "cond" not in prompts or prompts["cond"].ndim != 3:
        raise ValueError(f"prompt_embeddings {str(path)!r} must hold a 'cond' tensor (P, L, D) "
                         "and optionally an 'uncond' tensor (L, D)")
    return prompts
