"""Image grids and PNG files without torchvision (which must not be installed here)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from accuquant_pl.io import atomic_path


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0) -> Tensor:
    """Tile (N, C, H, W) images in [-1, 1] into one (C, H', W') image in [0, 1]."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    scaled = ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = scaled[i]
    return grid


def save_png(image: Tensor, path: str | os.PathLike, scale: int = 4) -> None:
    """Save a (C, H, W) image in [0, 1] as a PNG, nearest-upscaled ``scale`` times, atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    array = image.detach().cpu().clamp(0, 1).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = array.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    with atomic_path(path) as tmp:
        plt.imsave(tmp, array, format="png")


def with_title(image: Tensor, title: str, height: int = 12) -> Tensor:
    """``image`` (C, H, W) in [0, 1] under a white strip with ``title`` written in black (Pillow's default font)."""
    from PIL import Image, ImageDraw

    strip = Image.new("L", (image.shape[2], height), 255)
    ImageDraw.Draw(strip).text((2, 0), title, fill=0)
    text = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0).expand(image.shape[0], -1, -1)
    return torch.cat([text, image.detach().cpu()], dim=1)


def side_by_side(fp: Tensor, other: Tensor, nrow: int = 8, titles: tuple[str, str] = ("FP", "quantized")) -> Tensor:
    """One (C, H', W') image: the FP samples on the left, the evaluated model's from the same noises on the right,
    each half under its title."""
    left = with_title(make_grid(fp[:64], nrow=nrow), titles[0])
    right = with_title(make_grid(other[:64], nrow=nrow), titles[1])
    pad = torch.ones(left.shape[0], left.shape[1], 4)
    return torch.cat([left, pad, right], dim=2)
