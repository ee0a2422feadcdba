"""FID/KID tooling: feature extractors (:mod:`.inception`), metrics (:mod:`.fid`), the real-statistics cache (:mod:`.stats_cache`) and a
per-image-set feature cache (:mod:`.feature_cache`)."""

from accuquant_pl.metrics.feature_cache import SampleFeatureCache, images_digest
from accuquant_pl.metrics.fid import (
    FeatureStats,
    ImageSource,
    compute_feature_stats,
    extractor_identity,
    fid_against_stats,
    fid_between,
    fid_from_stats,
    kid_between,
    make_fid,
    make_kid,
    noise_floor,
)
from accuquant_pl.metrics.inception import (
    FID_HELPER_INSTALL_HINT,
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

__all__ = [
    "FID_HELPER_INSTALL_HINT",
    "FeatureStats",
    "ImageSource",
    "InceptionFeatureExtractor",
    "InceptionWeightsNotFoundError",
    "RandomProjectionFeatures",
    "RealStatsCache",
    "SampleFeatureCache",
    "StatsCacheCorruptError",
    "StatsCacheError",
    "StatsCacheMismatchError",
    "compute_feature_stats",
    "default_inception_weights_path",
    "extractor_identity",
    "fid_against_stats",
    "fid_between",
    "fid_from_stats",
    "images_digest",
    "kid_between",
    "load_stats",
    "make_fid",
    "make_kid",
    "noise_floor",
    "save_stats",
]
