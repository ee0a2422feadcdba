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


def test_the_suite_runs_on_one_thread_and_so_do_its_subprocesses():
    import os

    import torch

    from tests.conftest import TEST_THREADS

    assert torch.get_num_threads() == TEST_THREADS == 1
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
