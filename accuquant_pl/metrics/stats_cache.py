"""The on-disk cache of real-data feature statistics (mean and covariance per dataset and extractor), written
atomically and checked on read: a corrupt or mismatched file raises instead of giving a wrong FID."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from accuquant_pl.io import atomic_path
from accuquant_pl.metrics.fid import (
    FeatureStats,
    ImageSource,
    compute_feature_stats,
    extractor_identity,
    fid_against_stats,
)

_CACHE_FORMAT = "accuquant-fid-stats"
_CACHE_VERSION = 1


class StatsCacheError(RuntimeError):
    """A statistics cache file cannot be used."""


class StatsCacheCorruptError(StatsCacheError):
    """The cache file is unreadable, truncated or inconsistent."""


class StatsCacheMismatchError(StatsCacheError):
    """The cache file was made for another dataset key or another feature extractor."""


def save_stats(path: str | Path, stats: FeatureStats, dataset_key: str, extractor_id: str) -> Path:
    """Write ``stats`` and a manifest to an ``.npz`` atomically (temp file in the same folder + os.replace).

    A reader never sees a half-written file, and concurrent writers of the same key just race to an
    equally valid result.
    """
    path = Path(path)
    manifest = {
        "format": _CACHE_FORMAT,
        "version": _CACHE_VERSION,
        "dataset_key": dataset_key,
        "extractor_id": extractor_id,
        "num_features": stats.num_features,
        "num_samples": stats.num_samples,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            mean=stats.mean.double().cpu().numpy(),
            cov=stats.cov.double().cpu().numpy(),
            num_samples=np.int64(stats.num_samples),
            manifest=np.str_(json.dumps(manifest, sort_keys=True)),
        )
    return path


def load_stats(
    path: str | Path, dataset_key: str | None = None, extractor_id: str | None = None
) -> FeatureStats:
    """Read statistics written by :func:`save_stats`, checking the manifest against the given keys.

    Raises:
        FileNotFoundError: no file at ``path``.
        StatsCacheCorruptError: unreadable file, bad manifest, wrong shapes or non-finite values.
        StatsCacheMismatchError: ``dataset_key`` / ``extractor_id`` differ from the manifest's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no statistics file at {path}")
    hint = f"delete {path} to recompute it"
    try:
        with np.load(path, allow_pickle=False) as data:
            manifest = json.loads(str(data["manifest"]))
            mean = torch.from_numpy(np.array(data["mean"], dtype=np.float64))
            cov = torch.from_numpy(np.array(data["cov"], dtype=np.float64))
            num_samples = int(data["num_samples"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise StatsCacheCorruptError(
            f"statistics cache {path} is unreadable ({type(exc).__name__}: {exc}); {hint}"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != _CACHE_FORMAT:
        raise StatsCacheCorruptError(f"{path} is not an {_CACHE_FORMAT} file; {hint}")
    if manifest.get("version") != _CACHE_VERSION:
        raise StatsCacheCorruptError(
            f"{path} has format version {manifest.get('version')}, expected {_CACHE_VERSION}; {hint}"
        )
    d = mean.shape[0] if mean.dim() == 1 else -1
    if (
        d < 1
        or cov.shape != (d, d)
        or num_samples < 2
        or manifest.get("num_features") != d
        or manifest.get("num_samples") != num_samples
        or not bool(torch.isfinite(mean).all())
        or not bool(torch.isfinite(cov).all())
    ):
        raise StatsCacheCorruptError(
            f"statistics cache {path} is inconsistent (mean {tuple(mean.shape)}, cov {tuple(cov.shape)}, "
            f"num_samples {num_samples}, manifest {manifest}); {hint}"
        )
    for name, expected in (("dataset_key", dataset_key), ("extractor_id", extractor_id)):
        if expected is not None and manifest.get(name) != expected:
            raise StatsCacheMismatchError(
                f"statistics cache {path} was made for {name}={manifest.get(name)!r}, but {expected!r} was "
                f"requested; {hint}, or use another cache folder"
            )
    return FeatureStats(mean=mean, cov=cov, num_samples=num_samples)


def extractor_tag(extractor_id: str) -> str:
    """Short hash of an extractor identity: the part of a cache file name that tells extractors apart."""
    return hashlib.sha256(extractor_id.encode()).hexdigest()[:12]


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "dataset"


class RealStatsCache:
    """Per-dataset real-image feature statistics, computed once and reused from ``cache_dir``.

    Files are named ``<dataset_key>__<hash of extractor identity>.npz``, so several extractors can share one
    folder; each file's manifest is checked on load, and a file whose manifest does not match (a copied or
    renamed file, a sanitised-name collision) or that is corrupt raises a :class:`StatsCacheError` instead
    of being silently recomputed.

    Args:
        cache_dir: folder of the cache files (created on first save).
        extractor: the feature extractor the statistics belong to.
        extractor_id: override of :func:`extractor_identity` (e.g. when the extractor has no ``identity``).
    """

    def __init__(self, cache_dir: str | Path, extractor: nn.Module, extractor_id: str | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.extractor = extractor
        self.extractor_id = extractor_id or extractor_identity(extractor)

    def path_for(self, dataset_key: str) -> Path:
        """Cache file of ``dataset_key`` for this extractor."""
        return self.cache_dir / f"{_safe_name(dataset_key)}__{extractor_tag(self.extractor_id)}.npz"

    def get(self, dataset_key: str) -> FeatureStats | None:
        """Cached statistics of ``dataset_key``, or ``None`` when there is no file (errors if it is bad)."""
        path = self.path_for(dataset_key)
        if not path.exists():
            return None
        return load_stats(path, dataset_key=dataset_key, extractor_id=self.extractor_id)

    def get_or_compute(
        self,
        dataset_key: str,
        images: ImageSource | Callable[[], ImageSource],
        batch_size: int = 64,
    ) -> FeatureStats:
        """Return cached statistics, computing and saving them first on a miss.

        ``images`` may be a zero-argument callable returning the image source, so that an expensive dataset
        is only loaded on a miss.
        """
        stats = self.get(dataset_key)
        if stats is not None:
            return stats
        source = images() if callable(images) else images
        stats = compute_feature_stats(source, self.extractor, batch_size=batch_size)
        save_stats(self.path_for(dataset_key), stats, dataset_key, self.extractor_id)
        return stats

    def fid(
        self,
        dataset_key: str,
        fake_images: ImageSource,
        real_images: ImageSource | Callable[[], ImageSource] | None = None,
        batch_size: int = 64,
    ) -> float:
        """FID of ``fake_images`` against the cached statistics of ``dataset_key``.

        Without ``real_images`` the statistics must already be cached.
        """
        if real_images is None:
            stats = self.get(dataset_key)
            if stats is None:
                raise StatsCacheError(
                    f"no cached statistics for {dataset_key!r} at {self.path_for(dataset_key)}; pass real_images"
                )
        else:
            stats = self.get_or_compute(dataset_key, real_images, batch_size=batch_size)
        return fid_against_stats(stats, fake_images, self.extractor, batch_size=batch_size)
