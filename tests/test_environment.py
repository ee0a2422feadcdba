"""The install must never bring torchvision: here it is a CUDA build that breaks lightning/diffusers imports."""

import importlib.util

import torch


def test_torchvision_is_not_importable():
    assert importlib.util.find_spec("torchvision") is None, (
        "torchvision is installed; some dependency pulled it in. Remove it (pip uninstall torchvision) "
        "and find the package that requires it."
    )


def test_torch_is_the_pinned_cpu_build():
    assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
