"""On-disk cache of the feature vectors of image sets, keyed by the images' bytes and the extractor.

Inception on CPU costs ~0.2 s per image, and a results page measures dozens of sample sets of which only a
few change between regenerations: each set's features are computed once and reused while its images are
bit-for-bit the same. A file that is unreadable or was written for other images or another extractor raises
(:class:`StatsCacheError`) instead of being silently recomputed or, worse, used.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from accuquant_pl.io import atomic_path
from accuquant_pl.metrics.stats_cache import (
    StatsCacheCorruptError,
    StatsCacheMismatchError,
    extractor_tag,
)

_FORMAT = "accuquant-sample-features"


def images_digest(images: Tensor) -> str:
    """SHA-256 of an image tensor's dtype, shape and values (what its features depend on)."""
    digest = hashlib.sha256(f"{images.dtype}{tuple(images.shape)}".encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class SampleFeatureCache:
    """Features of image sets under ``cache_dir``, one ``.npz`` per (images, extractor).

    Args:
        cache_dir: folder of the cache files (created on the first save).
        extractor_id: names the feature extractor (``extractor_identity``); part of every file's key.
    """

    def __init__(self, cache_dir: str | Path, extractor_id: str) -> None:
        self.cache_dir = Path(cache_dir)
        self.extractor_id = extractor_id

    def path_for(self, images_sha256: str) -> Path:
        return self.cache_dir / f"{images_sha256[:24]}__{extractor_tag(self.extractor_id)}.npz"

    def get_or_compute(self, images: Tensor, extract: Callable[[Tensor], Tensor]) -> Tensor:
        """The features of ``images``: read from the cache, or ``extract(images)`` saved there first."""
        key = images_digest(images)
        path = self.path_for(key)
        if path.exists():
            return self._load(path, key, len(images))
        features = extract(images)
        manifest = {"format": _FORMAT, "images_sha256": key, "extractor_id": self.extractor_id,
                    "num_images": len(images)}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, features=features.detach().cpu().numpy(), manifest=np.array(json.dumps(manifest)))
        return features

    def _load(self, path: Path, key: str, num_images: int) -> Tensor:
        hint = f"delete {path} to recompute it"
        try:
            with np.load(path, allow_pickle=False) as data:
                manifest = json.loads(str(data["manifest"]))
                features = torch.from_numpy(np.array(data["features"]))
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise StatsCacheCorruptError(f"feature cache {path} is unreadable ({type(exc).__name__}: {exc}); "
                                         f"{hint}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise StatsCacheCorruptError(f"{path} is not an {_FORMAT} file; {hint}")
        if manifest.get("images_sha256") != key or manifest.get("extractor_id") != self.extractor_id:
            raise StatsCacheMismatchError(f"feature cache {path} was written for other images or another extractor "
                                          f"({manifest.get('extractor_id')!r}); {hint}")
        if features.dim() != 2 or features.shape[0] != num_images or not bool(torch.isfinite(features).all()):
            raise StatsCacheCorruptError(f"feature cache {path} holds features of shape {tuple(features.shape)} "
                                         f"(expected {num_images} finite rows); {hint}")
        return features
