import pytest
import torch

from accuquant_pl.evaluation.quality import SampleQualityMeter
from accuquant_pl.metrics import (
    SampleFeatureCache,
    StatsCacheCorruptError,
    StatsCacheMismatchError,
    images_digest,
)


def _images(seed: int) -> torch.Tensor:
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class CountingExtractor:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.flatten(1)[:, :5] * 3


def test_features_are_computed_once_per_image_set_and_reread_from_disk(tmp_path):
    extract = CountingExtractor()
    cache = SampleFeatureCache(tmp_path, "extractor-a")
    first = cache.get_or_compute(_images(0), extract)
    again = SampleFeatureCache(tmp_path, "extractor-a").get_or_compute(_images(0).clone(), extract)
    assert extract.calls == 1
    assert torch.equal(first, again)
    other = cache.get_or_compute(_images(1), extract)
    assert extract.calls == 2 and not torch.equal(first, other)
    # another extractor's features of the same images live in another file
    SampleFeatureCache(tmp_path, "extractor-b").get_or_compute(_images(0), extract)
    assert extract.calls == 3
    assert len(list(tmp_path.glob("*.npz"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_a_changed_pixel_is_a_cache_miss(tmp_path):
    extract = CountingExtractor()
    cache = SampleFeatureCache(tmp_path, "x")
    images = _images(0)
    cache.get_or_compute(images, extract)
    changed = images.clone()
    changed[0, 0, 0, 0] += 1e-3
    assert torch.equal(cache.get_or_compute(changed, extract), extract(changed))
    assert extract.calls == 3


def test_corrupt_or_foreign_cache_files_raise_naming_the_file(tmp_path):
    cache = SampleFeatureCache(tmp_path, "x")
    images = _images(0)
    path = cache.path_for(images_digest(images))
    cache.get_or_compute(images, CountingExtractor())
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StatsCacheCorruptError, match=str(path.name)):
        cache.get_or_compute(images, CountingExtractor())
    path.unlink()
    # a file written for other images, copied under this one's name
    other = SampleFeatureCache(tmp_path, "x")
    other.get_or_compute(_images(1), CountingExtractor())
    foreign = next(p for p in tmp_path.glob("*.npz"))
    foreign.rename(path)
    with pytest.raises(StatsCacheMismatchError, match="other images or another extractor"):
        cache.get_or_compute(images, CountingExtractor())


def test_meter_with_a_features_cache_gives_the_same_figures(tmp_path):
    fp, q = _images(0), _images(0) * 0.9
    plain = SampleQualityMeter("random-projection", None, 8, None, kid=False).measure(q, fp)
    cold = SampleQualityMeter("random-projection", None, 8, None, kid=False,
                              features_cache_dir=str(tmp_path)).measure(q, fp)
    warm = SampleQualityMeter("random-projection", None, 8, None, kid=False, features_cache_dir=str(tmp_path))
    warm.extractor = None  # a warm cache needs no extractor at all
    assert warm.measure(q, fp) == cold == plain
    assert len(list(tmp_path.glob("*.npz"))) == 2
