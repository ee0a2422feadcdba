"""Fixtures for the quantization tests: tiny diffusers UNets and calibration batches."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from quant_helpers import make_cond_unet, make_unet


@pytest.fixture(autouse=True)
def _single_thread_seeded():
    # Tensors here are tiny: intra-op thread wake-ups cost more than the maths (and stall badly on a busy
    # machine). Restore the caller's settings afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def unet() -> UNet2DModel:
    return make_unet()


@pytest.fixture
def cond_unet() -> UNet2DConditionModel:
    return make_cond_unet()
