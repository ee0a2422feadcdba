"""What a conditional denoiser is told besides (x, t): class labels or prompt embeddings, and the classifier-free
guidance to apply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from accuquant_pl.io import sha256_tree


@dataclass
class Conditioning:
    """What a conditional UNet is told besides (x, t), and the classifier-free guidance to apply."""

    class_labels: Tensor | None = None
    encoder_hidden_states: Tensor | None = None
    guidance_scale: float = 1.0
    """Classifier-free guidance weight s: eps = eps_u + s (eps_c - eps_u); 1.0 means no guidance."""
    uncond_class_labels: Tensor | None = None
    uncond_encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    """(B, L) 1 for the prompt tokens to attend to, 0 for padding (PixArt's T5 prompts); None: attend to all."""
    uncond_encoder_attention_mask: Tensor | None = None

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def kwargs(self, uncond: bool = False) -> dict[str, Tensor]:
        labels = self.uncond_class_labels if uncond else self.class_labels
        states = self.uncond_encoder_hidden_states if uncond else self.encoder_hidden_states
        mask = self.uncond_encoder_attention_mask if uncond else self.encoder_attention_mask
        out: dict[str, Tensor] = {}
        if labels is not None:
            out["class_labels"] = labels
        if states is not None:
            out["encoder_hidden_states"] = states
            if mask is not None:
                out["encoder_attention_mask"] = mask
        return out

    def to(self, device: torch.device) -> Conditioning:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return Conditioning(**moved)


def load_prompt_embeddings(path: str | Path) -> dict[str, Tensor]:
    """A prompt-embedding file: ``{'cond': (P, L, D), 'uncond': (L, D)}`` (the text encoder's outputs for P
    prompts and for the empty / negative prompt), as ``TrajectoryDataModule.prompt_embeddings`` reads it, and for
    a denoiser that masks the prompt's padding (PixArt) ``'cond_mask': (P, L)`` and ``'uncond_mask': (L,)``, the
    tokenizer's attention masks (1 = token, 0 = padding), which the denoiser is then given as the pipelines do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt_embeddings file {str(path)!r} does not exist")
    prompts = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(prompts, dict):
        raise ValueError(f"prompt_embeddings {str(path)!r} holds a {type(prompts).__name__}, expected a dict with a "
                         "'cond' tensor (P, L, D) and optionally an 'uncond' tensor (L, D)")
    for key in ("cond", "uncond", "cond_mask", "uncond_mask"):
        if key in prompts and not isinstance(prompts[key], torch.Tensor):
            raise ValueError(f"prompt_embeddings {str(path)!r}: {key!r} is a {type(prompts[key]).__name__}, "
                             "expected a tensor")
    if "cond" not in prompts or prompts["cond"].ndim != 3:
        found = f"shape {tuple(prompts['cond'].shape)}" if "cond" in prompts else f"keys {sorted(prompts)}"
        raise ValueError(f"prompt_embeddings {str(path)!r} must hold a 'cond' tensor (P, L, D) and optionally an "
                         f"'uncond' tensor (L, D); found {found}")
    cond = prompts["cond"]
    for key, ndim in (("uncond", 3), ("uncond_mask", 2)):
        if key in prompts and prompts[key].ndim == ndim and prompts[key].shape[0] == 1:
            prompts[key] = prompts[key][0]  # the negative prompt as a batch of one, as encode_prompt returns it
    expected = {"uncond": cond.shape[1:], "cond_mask": cond.shape[:2], "uncond_mask": cond.shape[1:2]}
    for key, shape in expected.items():
        if key in prompts and tuple(prompts[key].shape) != tuple(shape):
            raise ValueError(f"prompt_embeddings {str(path)!r}: {key!r} has shape {tuple(prompts[key].shape)}, "
                             f"expected {tuple(shape)} for 'cond' of shape {tuple(cond.shape)}")
    masks = [key for key in ("cond_mask", "uncond_mask") if key in prompts]
    # Masks come as a pair with the embeddings they mask: cond_mask always, uncond_mask exactly with uncond.
    if masks and ("cond_mask" not in prompts or ("uncond_mask" in prompts) != ("uncond" in prompts)):
        raise ValueError(f"prompt_embeddings {str(path)!r} holds {masks} with"
                         f"{'' if 'uncond' in prompts else 'out'} 'uncond': give 'cond_mask', and 'uncond_mask' "
                         "exactly when 'uncond' is given (the prompts' and the negative prompt's attention masks)")
    return prompts


@dataclass
class ConditioningSpec:
    """How sample (or trajectory) number i of a run is conditioned: one rule for the calibration trajectories,
    ``predict``, ``test`` and the FID callback, so that all of them see the same conditions.

    Unconditional models leave it out (None)."""

    class_labels: list[int] | None = None
    """Class-conditional models: sample i gets ``class_labels[i % len]``."""
    uncond_class_label: int | None = None
    """The class id given as the unconditional input under classifier-free guidance."""
    prompt_embeddings: str | None = None
    """Text-conditional models: a .pt file {'cond': (P, L, D), 'uncond': (L, D)} (and for PixArt the attention
    masks 'cond_mask': (P, L), 'uncond_mask': (L,)); sample i uses prompt ``i % P``."""
    guidance_scale: float = 1.0
    """Classifier-free guidance weight s (1.0 = none)."""

    def __post_init__(self) -> None:
        if self.class_labels is not None and self.prompt_embeddings is not None:
            raise ValueError("conditioning: give class_labels or prompt_embeddings, not both")
        if self.class_labels is not None and len(self.class_labels) == 0:
            raise ValueError("conditioning.class_labels is empty; leave it out for an unconditional model")
        if self.guidance_scale != 1.0 and self.class_labels is not None and self.uncond_class_label is None:
            raise ValueError(f"conditioning.guidance_scale {self.guidance_scale} with class_labels needs "
                             "uncond_class_label (the class id of the unconditional input)")
        self._prompts: dict[str, Tensor] | None = None

    @classmethod
    def of(cls, value: ConditioningSpec | dict | None) -> ConditioningSpec | None:
        """A spec from itself, its dict (a checkpoint's hyperparameters) or None."""
        return cls(**value) if isinstance(value, dict) else value

    def to_dict(self) -> dict:
        return {"class_labels": self.class_labels, "uncond_class_label": self.uncond_class_label,
                "prompt_embeddings": self.prompt_embeddings, "guidance_scale": self.guidance_scale}

    def prompts(self) -> dict[str, Tensor] | None:
        """The prompt embeddings (read once), or None for a class-conditional spec."""
        if self.prompt_embeddings is None:
            return None
        if self._prompts is None:
            self._prompts = load_prompt_embeddings(self.prompt_embeddings)
            if self.guidance_scale != 1.0 and "uncond" not in self._prompts:
                raise ValueError(f"conditioning.guidance_scale {self.guidance_scale} needs an 'uncond' embedding in "
                                 f"{self.prompt_embeddings!r}")
        return self._prompts

    def indices(self, index: Tensor) -> dict[str, Tensor]:
        """What a stored item of sample ``index`` records of its condition: its class label or its prompt number."""
        if self.class_labels:
            return {"class_labels": torch.tensor([self.class_labels[i % len(self.class_labels)] for i in index.tolist()])}
        if self.prompt_embeddings is not None:
            return {"prompt_index": index % self.prompts()["cond"].shape[0]}
        return {}

    def for_items(self, items: dict[str, Tensor], device: torch.device | None = None) -> Conditioning | None:
        """The :class:`Conditioning` of samples whose recorded conditions (:meth:`indices`) are ``items``."""
        if "class_labels" in items:
            labels = items["class_labels"].to(device)
            uncond = None if self.uncond_class_label is None else torch.full_like(labels, self.uncond_class_label)
            return Conditioning(class_labels=labels, uncond_class_labels=uncond, guidance_scale=self.guidance_scale)
        if "prompt_index" in items:
            prompts = self.prompts()
            states = prompts["cond"][items["prompt_index"].cpu()].to(device)
            uncond = prompts.get("uncond")
            uncond = uncond.expand_as(states).to(device) if uncond is not None else None
            mask, uncond_mask = prompts.get("cond_mask"), prompts.get("uncond_mask")
            if mask is not None:
                mask = mask[items["prompt_index"].cpu()].to(device)
                uncond_mask = uncond_mask.expand_as(mask).to(device) if uncond_mask is not None else None
            return Conditioning(encoder_hidden_states=states, uncond_encoder_hidden_states=uncond,
                                encoder_attention_mask=mask, uncond_encoder_attention_mask=uncond_mask,
                                guidance_scale=self.guidance_scale)
        return None

    def for_samples(self, index: Tensor, device: torch.device | None = None) -> Conditioning | None:
        """The :class:`Conditioning` of samples numbered ``index`` (seeds, or trajectory numbers)."""
        return self.for_items(self.indices(index.cpu().long()), device)

    def cache_key(self) -> dict:
        """What a cache of samples drawn under this spec depends on (the prompt file by its content)."""
        path = Path(self.prompt_embeddings) if self.prompt_embeddings else None
        return {"class_labels": self.class_labels, "uncond_class_label": self.uncond_class_label,
                "prompt_embeddings_sha256": sha256_tree(path.parent, lambda p: p.name == path.name) if path else None,
                "guidance_scale": self.guidance_scale}
