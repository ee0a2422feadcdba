"""Helpers shared by the benchmark scripts: the repository root and trajectory cache, the one ``--threads``
option, process memory readings from ``/proc/self/status`` (Linux) and the CIFAR-10-size UNet of the
calibration-cost benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
TRAJECTORY_CACHE = REPO / ".cache" / "trajectories"
"""Where the benchmarks keep the FP calibration trajectories (the data module's ``cache_dir``)."""
CIFAR_PARAMS = 35_746_307  # google/ddpm-cifar10-32

THREADS_HELP = ("torch intra-op threads of this process, and OMP / MKL threads of the calibrations it starts "
                "(recorded: float reduction order, hence a few samples, can depend on it)")


# ------------------------------------------------------------------------------------------------------ threads


def add_threads_argument(parser: argparse.ArgumentParser, default: int = 1) -> None:
    """The scripts' one ``--threads N`` option (an int; ``set_threads`` applies it)."""
    parser.add_argument("--threads", type=int, default=default, help=THREADS_HELP)


def set_threads(threads: int) -> None:
    """Use ``threads`` torch intra-op threads in this process."""
    torch.set_num_threads(threads)


def threads_env(threads: int) -> dict[str, str]:
    """This process's environment with ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` set to ``threads``: a subprocess
    started with it uses ``threads`` threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# ------------------------------------------------------------------------------------------------------ memory


def proc_status_kb(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status``, in kB (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_rss_peak() -> bool:
    """Hand freed heap memory back (``malloc_trim``) and reset ``VmHWM`` to the current RSS, so that the next peak
    is measured from here; False where ``/proc/self/clear_refs`` cannot be written (no peak can be measured)."""
    with contextlib.suppress(OSError):  # hand freed heap memory back so the next peak is measured from scratch
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------------ models


def cifar_unet() -> tuple[nn.Module, str]:
    """A diffusers UNet2DModel with google/ddpm-cifar10-32's architecture (35.75M parameters, 32x32x3), random
    weights (seed 0), and a line saying so."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    count = sum(p.numel() for p in unet.parameters())
    if count != CIFAR_PARAMS:
        raise RuntimeError(f"CIFAR-10 DDPM architecture has {count} parameters, expected {CIFAR_PARAMS}")
    return unet, "google/ddpm-cifar10-32 architecture, random weights"
