"""Structural knowledge of diffusers denoisers: first/last layers, skip-concat split points, reconstruction units.

UNets (``UNet2DModel``, ``UNet2DConditionModel``) and transformer denoisers (``DiTTransformer2DModel``,
``PixArtTransformer2DModel``). Everything is derived from the model's config and module tree, never from a
forward pass.
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from torch import nn

from accuquant_pl.denoisers import check_denoiser, is_transformer

FIRST_LAST_LAYERS = ("conv_in", "conv_out")
INPUT_LAYER = "conv_in"
"""The layer whose input activation is the network input (the sampler state x_t)."""
# Top-level modules that run before conv_in, in UNet2DConditionModel.forward / UNet2DModel.forward order.
_EMBEDDINGS = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj")
# Transformers: the patch embedding's convolution sees x_t; the last projection writes the output.
_TRANSFORMER_INPUT = "pos_embed.proj"
_TRANSFORMER_OUTPUT = {DiTTransformer2DModel: "proj_out_2", PixArtTransformer2DModel: "proj_out"}
# Top-level modules of the transformers in forward order, the blocks (``transformer_blocks``) in between.
_BEFORE_BLOCKS = ("pos_embed", "adaln_single", "caption_projection")
_AFTER_BLOCKS = ("proj_out_1", "proj_out_2", "proj_out")


def first_last_layers(model: nn.Module) -> tuple[str, str]:
    """(the layer whose input is the network input x_t, the layer that writes the network output)."""
    check_denoiser(model)
    if is_transformer(model):
        return _TRANSFORMER_INPUT, _TRANSFORMER_OUTPUT[type(model)]
    return FIRST_LAST_LAYERS


def skip_split_points(model: nn.Module) -> dict[str, int]:
    """``{name of up-block resnet conv_shortcut: number of hidden (non-skip) input channels}``.

    Up-block resnet ``i`` of up block ``b`` receives ``cat([hidden, res_skip], dim=1)`` with, as in
    ``UNet2DModel.__init__`` / ``get_up_block``: hidden channels = ``prev_output_channel`` if ``i == 0``
    else ``output_channel``; skip channels = ``input_channel`` for the last resnet else ``output_channel``.
    Only ``conv_shortcut`` sees the raw concatenation (conv1 sees it after GroupNorm + activation).
    """
    check_denoiser(model)
    if is_transformer(model):
        return {}  # no skip concatenations
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
    check_denoiser(model)
    if is_transformer(model):
        return _transformer_units(model)
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



def _transformer_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """A transformer's units: the patch embedding (and PixArt's timestep and caption embeddings), each transformer
    block in order, then the output projections. DiT's blocks each hold their own timestep/class (adaLN)
    embedding; its final modulation reuses the first block's, calibrated with that block."""
    units = [(n, getattr(model, n)) for n in _BEFORE_BLOCKS if getattr(model, n, None) is not None]
    units += [(f"transformer_blocks.{i}", block) for i, block in enumerate(model.transformer_blocks)]
    units += [(n, getattr(model, n)) for n in _AFTER_BLOCKS if isinstance(getattr(model, n, None), nn.Module)]
    return [(n, m) for n, m in units if any(True for _ in m.parameters())]
