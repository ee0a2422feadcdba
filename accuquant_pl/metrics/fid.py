"""Offline FID/KID on top of torchmetrics (the cache of real-data statistics is :mod:`.stats_cache`).

All images are float ``(N, C, H, W)`` in ``[-1, 1]`` (``C`` in ``{1, 3}``); the extractor (see
:mod:`accuquant_pl.metrics.inception`) does the rest. The Fréchet and kernel maths are torchmetrics'
(``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with ``feature=<extractor module>``); this module
only feeds them, and injects cached real statistics into the FID metric's state so that a cached result
is the same computation as a direct one.

An image source (``ImageSource``) is either one tensor, sliced into ``batch_size`` chunks, or an iterable of
batches (tensors, or tuples/lists whose first element is the image tensor, as a DataLoader yields).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

__all__ = [
    "FeatureStats",
    "ImageSource",
    "compute_feature_stats",
    "extractor_identity",
    "fid_against_stats",
    "fid_between",
    "fid_from_stats",
    "kid_between",
    "make_fid",
    "make_kid",
    "noise_floor",
]

ImageSource = Tensor | Iterable[Tensor | tuple | list]


@dataclass(frozen=True)
class FeatureStats:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64, CPU) of ``num_samples`` feature vectors."""

    mean: Tensor
    cov: Tensor
    num_samples: int

    @property
    def num_features(self) -> int:
        """Feature dimension ``D``."""
        return int(self.mean.shape[0])


# --------------------------------------------------------------------------------------------- helpers


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _num_features(extractor: nn.Module) -> int:
    n = getattr(extractor, "num_features", None)
    if not isinstance(n, int):
        # Without it torchmetrics probes the module with a uint8 image in [0, 255], which our extractors
        # (rightly) reject; ask for the attribute rather than guess.
        raise TypeError(f"extractor {type(extractor).__name__} needs an int attribute `num_features`")
    return n


def _batches(images: ImageSource, batch_size: int) -> Iterator[Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    for item in images:
        batch = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(batch, Tensor):
            raise TypeError(f"image batches must be tensors, got {type(batch).__name__}")
        yield from batch.split(batch_size)


def _feed(
    metric: FrechetInceptionDistance | KernelInceptionDistance,
    images: ImageSource,
    real: bool,
    batch_size: int,
) -> None:
    for batch in _batches(images, batch_size):
        metric.update(batch, real=real)


def extractor_identity(extractor: nn.Module) -> str:
    """Return a string naming an extractor: its ``identity`` attribute, else a hash of its class and weights.

    The hash fallback does not see preprocessing code, so custom extractors should define ``identity``.
    """
    ident = getattr(extractor, "identity", None)
    if isinstance(ident, str) and ident:
        return ident
    digest = hashlib.sha256(type(extractor).__qualname__.encode())
    for name, tensor in sorted(extractor.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(extractor).__qualname__}(state_sha256={digest.hexdigest()})"


# --------------------------------------------------------------------------------------------- metrics


def make_fid(extractor: nn.Module, reset_real_features: bool = True) -> FrechetInceptionDistance:
    """Return a torchmetrics ``FrechetInceptionDistance`` using ``extractor``, on the extractor's device.

    Feed it with ``metric.update(images_in_minus1_1, real=...)``; torchmetrics passes the images to the
    extractor unchanged (its ``normalize`` flag only concerns its built-in network).
    """
    _num_features(extractor)
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=reset_real_features)
    return metric.to(_module_device(extractor))


def make_kid(extractor: nn.Module, subsets: int = 100, subset_size: int = 1000) -> KernelInceptionDistance:
    """Return a torchmetrics ``KernelInceptionDistance`` using ``extractor`` (keeps all features in memory)."""
    with warnings.catch_warnings():
        # torchmetrics always warns that KID buffers every feature; that is the point of KID.
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=extractor, subsets=subsets, subset_size=subset_size)
    return metric.to(_module_device(extractor))


def fid_between(a: ImageSource, b: ImageSource, extractor: nn.Module, batch_size: int = 64) -> float:
    """FID between two image sources (``a`` is fed as "real", ``b`` as "fake"; FID is symmetric)."""
    metric = make_fid(extractor)
    _feed(metric, a, real=True, batch_size=batch_size)
    _feed(metric, b, real=False, batch_size=batch_size)
    return float(metric.compute())


def kid_between(
    a: ImageSource,
    b: ImageSource,
    extractor: nn.Module,
    batch_size: int = 64,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets) between two image sources.

    ``subset_size`` is lowered to the size of the smaller set, so small sets work (at least 2 images each);
    when it reaches the set sizes every subset is the whole set and the std is 0, not an error bar.
    Subsets are drawn from a private RNG seeded with ``seed``: the result is reproducible and the global
    RNG is left untouched.
    """
    metric = make_kid(extractor, subsets=subsets, subset_size=subset_size)
    _feed(metric, a, real=True, batch_size=batch_size)
    _feed(metric, b, real=False, batch_size=batch_size)
    n = min(sum(f.shape[0] for f in metric.real_features), sum(f.shape[0] for f in metric.fake_features))
    if n < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {n}")
    metric.subset_size = min(subset_size, n)
    # torchmetrics draws subsets with torch.randperm on the global CPU generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def noise_floor(
    fp_samples: Tensor,
    extractor: nn.Module,
    fp_samples_b: Tensor | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> float:
    """FID between two disjoint sets of full-precision samples: the FID a perfect quantizer would still get.

    With ``fp_samples_b=None`` the samples are split into two random halves (seeded; an odd one out is
    dropped). Otherwise ``fp_samples`` and ``fp_samples_b`` must have the same size and be independent
    draws (e.g. different seeds); compare a quantized model's FID against the floor at that same size,
    since FID is biased upwards at small sample counts.
    """
    if fp_samples_b is None:
        n = fp_samples.shape[0] // 2
        if n < 2:
            raise ValueError(f"need at least 4 samples to split into halves, got {fp_samples.shape[0]}")
        perm = torch.randperm(fp_samples.shape[0], generator=torch.Generator().manual_seed(seed))
        first, second = (
            fp_samples[perm[:n].to(fp_samples.device)],
            fp_samples[perm[n : 2 * n].to(fp_samples.device)],
        )
    else:
        if fp_samples.shape[0] != fp_samples_b.shape[0]:
            raise ValueError(
                f"the two sample sets must have equal size, got {fp_samples.shape[0]} and {fp_samples_b.shape[0]}"
            )
        if fp_samples.data_ptr() == fp_samples_b.data_ptr():
            raise ValueError("fp_samples_b is the same tensor as fp_samples; pass an independent set")
        first, second = fp_samples, fp_samples_b
    return fid_between(first, second, extractor, batch_size=batch_size)


# --------------------------------------------------------------------------------------------- statistics


def compute_feature_stats(images: ImageSource, extractor: nn.Module, batch_size: int = 64) -> FeatureStats:
    """Mean/covariance of the extractor's features over an image source.

    Accumulated by torchmetrics' FID metric (float64 sums) and finished with the formula of its
    ``compute()``, so statistics injected back (see :func:`fid_against_stats`) reproduce a direct FID.
    """
    metric = make_fid(extractor)
    _feed(metric, images, real=True, batch_size=batch_size)
    n = int(metric.real_features_num_samples)
    if n < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {n}")
    mean = metric.real_features_sum / n
    cov = (metric.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    return FeatureStats(mean=mean.detach().cpu(), cov=cov.detach().cpu(), num_samples=n)


def _inject(metric: FrechetInceptionDistance, stats: FeatureStats, real: bool) -> None:
    """Set the metric's running sums so that its compute() sees exactly ``stats``."""
    device = metric.real_features_sum.device
    n = stats.num_samples
    mean = stats.mean.to(device=device, dtype=torch.float64)
    cov = stats.cov.to(device=device, dtype=torch.float64)
    prefix = "real" if real else "fake"
    setattr(metric, f"{prefix}_features_sum", mean * n)
    setattr(metric, f"{prefix}_features_cov_sum", cov * (n - 1) + n * torch.outer(mean, mean))
    setattr(metric, f"{prefix}_features_num_samples", torch.tensor(n, dtype=torch.long, device=device))


def _check_dims(stats: FeatureStats, num_features: int) -> None:
    if stats.num_features != num_features:
        raise ValueError(f"statistics have {stats.num_features} features, extractor gives {num_features}")


def fid_against_stats(
    real_stats: FeatureStats, fake_images: ImageSource, extractor: nn.Module, batch_size: int = 64
) -> float:
    """FID between precomputed (e.g. cached) real statistics and a set of generated images."""
    _check_dims(real_stats, _num_features(extractor))
    metric = make_fid(extractor, reset_real_features=False)
    _inject(metric, real_stats, real=True)
    _feed(metric, fake_images, real=False, batch_size=batch_size)
    return float(metric.compute())


class _StatsOnly(nn.Module):
    """Placeholder extractor for a FID metric that only ever receives injected statistics."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never called
        raise RuntimeError("this FID metric only holds precomputed statistics")


def fid_from_stats(real_stats: FeatureStats, fake_stats: FeatureStats) -> float:
    """FID between two sets of precomputed statistics (torchmetrics' formula)."""
    _check_dims(fake_stats, real_stats.num_features)
    metric = make_fid(_StatsOnly(real_stats.num_features))
    _inject(metric, real_stats, real=True)
    _inject(metric, fake_stats, real=False)
    # compute() casts its result to the dtype of the last features seen in update(); there was no update.
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return float(metric.compute())
