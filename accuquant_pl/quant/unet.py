"""Structural knowledge of diffusers UNets: skip-concat split points, first/last layers, reconstruction units.

Everything is derived from the model's config and module tree, never from a forward pass.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

SUPPORTED_UNETS = (UNet2DModel, UNet2DConditionModel)
FIRST_LAST_LAYERS = ("conv_in", "conv_out")
INPUT_LAYER = "conv_in"
"""The layer whose input activation is the network input (the sampler state x_t)."""
# Top-level modules that run before conv_in, in UNet2DConditionModel.forward / UNet2DModel.forward order.
_EMBEDDINGS = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj")


def check_unet(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model`` is a supported diffusers UNet."""
    if not isinstance(model, SUPPORTED_UNETS):
        raise TypeError(f"expected one of {[c.__name__ for c in SUPPORTED_UNETS]}, got {type(model).__name__}")


def skip_split_points(model: nn.Module) -> dict[str, int]:
    """``{name of up-block resnet conv_shortcut: number of hidden (non-skip) input channels}``.

    Up-block resnet ``i`` of up block ``b`` receives ``cat([hidden, res_skip], dim=1)`` with, as in
    ``UNet2DModel.__init__`` / ``get_up_block``: hidden channels = ``prev_output_channel`` if ``i == 0``
    else ``output_channel``; skip channels = ``input_channel`` for the last resnet else ``output_channel``.
    Only ``conv_shortcut`` sees the raw concatenation (conv1 sees it after GroupNorm + activation).
    """
    check_unet(model)
    rev = list(reversed(model.config.block_out_channels))
    points: dict[str, int] = {}
    for b, block in enumerate(model.up_blocks):
        prev_out, out = rev[max(b - 1, 0)], rev[b]
        inp = rev[min(b + 1, len(rev) - 1)]
        resnets = getattr(block, "resnets", [])
        for i, resnet in enumerate(resnets):
            hidden = prev_out if i == 0 else out
            skip = inp if i == len(resnets) - 1 else out
            shortcut = getattr(resnet, "conv_shortcut", None)
            if shortcut is None:
                continue
            name = f"up_blocks.{b}.resnets.{i}.conv_shortcut"
            if shortcut.in_channels != hidden + skip:
                raise ValueError(f"{name}: config gives {hidden}+{skip} input channels, layer has "
                                 f"{shortcut.in_channels}; unsupported up-block type {type(block).__name__}")
            points[name] = hidden
    return points


def _block_units(prefix: str, block: nn.Module, mid: bool = False) -> list[tuple[str, nn.Module]]:
    resnets = list(getattr(block, "resnets", []))
    attentions = list(getattr(block, "attentions", None) or [])
    units: list[tuple[str, nn.Module]] = []
    if mid:  # UNetMidBlock2D(CrossAttn): resnet0, then (attention_i, resnet_{i+1})
        units.append((f"{prefix}.resnets.0", resnets[0]))
        for i, res in enumerate(resnets[1:]):
            if i < len(attentions) and attentions[i] is not None:
                units.append((f"{prefix}.attentions.{i}", attentions[i]))
            units.append((f"{prefix}.resnets.{i + 1}", res))
        return units
    for i, res in enumerate(resnets):  # down/up blocks: (resnet_i, attention_i) pairs
        units.append((f"{prefix}.resnets.{i}", res))
        if i < len(attentions) and attentions[i] is not None:
            units.append((f"{prefix}.attentions.{i}", attentions[i]))
    for kind in ("downsamplers", "upsamplers"):
        for i, sampler in enumerate(getattr(block, kind, None) or []):
            units.append((f"{prefix}.{kind}.{i}", sampler))
    return units


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Reconstruction units (blocks) in forward-execution order.

    Embeddings (time_embedding, class_embedding, add_embedding, encoder_hid_proj, where present) come
    first because the UNets compute them before ``conv_in`` (the two branches are independent); then
    ``conv_in``; every resnet / attention (or Transformer2DModel) / down-sampler of the down blocks; the
    mid block's resnets and attentions; the up blocks' resnets / attentions / up-samplers; ``conv_out``
    (conv_norm_out has nothing to quantize). Units without parameters are left out.
    """
    check_unet(model)
    units = [(n, getattr(model, n)) for n in _EMBEDDINGS if getattr(model, n, None) is not None]
    units.append(("conv_in", model.conv_in))
    for b, block in enumerate(model.down_blocks):
        units += _block_units(f"down_blocks.{b}", block)
    if model.mid_block is not None:
        units += _block_units("mid_block", model.mid_block, mid=True)
    for b, block in enumerate(model.up_blocks):
        units += _block_units(f"up_blocks.{b}", block)
    units.append(("conv_out", model.conv_out))
    return [(n, m) for n, m in units if any(True for _ in m.parameters())]
