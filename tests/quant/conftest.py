"""Fixtures for the quantization tests: tiny diffusers UNets and calibration batches."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from quant_helpers import make_cond_unet, make_unet


@pytest.fixture(autouse=True)
def _seeded():
    # One thread comes from tests/conftest.py (TEST_THREADS); the seed is restored by its _restore_torch_state.
    torch.manual_seed(0)


@pytest.fixture
def unet() -> UNet2DModel:
    return make_unet()


@pytest.fixture
def cond_unet() -> UNet2DConditionModel:
    return make_cond_unet()
