"""The denoiser registry: one list of supported classes, asked by class (and by stand-in name for ONNX Runtime)."""

from __future__ import annotations

import pytest
from diffusers import DiTTransformer2DModel
from torch import nn

from accuquant_pl.denoisers import SUPPORTED_DENOISERS, check_denoiser, denoiser_class, is_transformer
from tests.conftest import tiny_unet
from tests.tiny_models import tiny_dit, tiny_pixart


def test_unets_and_transformers_are_told_apart():
    assert not is_transformer(tiny_unet()) and not is_transformer(None)
    assert is_transformer(tiny_dit()) and is_transformer(tiny_pixart())
    for model in (tiny_unet(), tiny_dit(), tiny_pixart()):
        check_denoiser(model)
        assert denoiser_class(model) in SUPPORTED_DENOISERS


def test_a_subclass_and_a_stand_in_count_as_what_they_are():
    class MyDiT(DiTTransformer2DModel):
        pass

    sub = MyDiT(**tiny_dit().config)
    check_denoiser(sub)
    assert is_transformer(sub)

    class OnnxStandIn(nn.Module):  # what OnnxDenoiser (deploy/onnx_runtime.py) does: it names the class it replaces
        denoiser_class = "DiTTransformer2DModel"

    assert is_transformer(OnnxStandIn())


def test_an_unsupported_model_is_named():
    with pytest.raises(TypeError, match="expected one of .*UNet2DModel.*got Linear"):
        check_denoiser(nn.Linear(2, 2))
