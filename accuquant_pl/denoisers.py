"""The one registry of the diffusers denoiser classes this project calibrates, and the questions asked of a denoiser
by its class: which class it is (or stands in for), whether it is a transformer, whether it is supported.

It sits at the bottom of the layout with ``io`` (``quant`` and ``diffusion`` both read it), so that the list of
supported classes is written once.
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

SUPPORTED_UNETS: dict[str, type[nn.Module]] = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
}
SUPPORTED_TRANSFORMERS: dict[str, type[nn.Module]] = {
    "DiTTransformer2DModel": DiTTransformer2DModel,  # facebook/DiT-XL-2-*: pipeline component ``transformer``
    "PixArtTransformer2DModel": PixArtTransformer2DModel,  # PixArt-alpha / sigma
}
SUPPORTED_DENOISERS: dict[str, type[nn.Module]] = {**SUPPORTED_UNETS, **SUPPORTED_TRANSFORMERS}
"""Every denoiser class this project calibrates, by diffusers class name: the UNets and the transformer denoisers."""
Denoiser = UNet2DModel | UNet2DConditionModel | DiTTransformer2DModel | PixArtTransformer2DModel


def denoiser_class(model: nn.Module) -> str:
    """The diffusers class name of a denoiser, or of the one it stands in for (an ONNX Runtime denoiser names it
    in its ``denoiser_class`` attribute)."""
    return getattr(model, "denoiser_class", type(model).__name__)


def is_transformer(model: nn.Module | None) -> bool:
    """Whether ``model`` is (a subclass of, or stands in for) a transformer denoiser (DiT, PixArt): input
    ``hidden_states``, per-sample timesteps and, with a learned variance, twice the input's channels out."""
    if model is None:
        return False
    return isinstance(model, tuple(SUPPORTED_TRANSFORMERS.values())) or denoiser_class(model) in SUPPORTED_TRANSFORMERS


def check_denoiser(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model`` is an instance of a supported diffusers denoiser class."""
    if not isinstance(model, tuple(SUPPORTED_DENOISERS.values())):
        raise TypeError(f"expected one of {list(SUPPORTED_DENOISERS)}, got {type(model).__name__}")
