"""Per-sample error statistics and paired comparisons (the robust evaluation protocol's arithmetic)."""

from __future__ import annotations

import pytest
import torch

from accuquant_pl.metrics.sample_errors import (
    bootstrap_mean_interval,
    paired_comparison,
    per_sample_mse,
    sample_error_stats,
)


def test_per_sample_mse_by_hand():
    fp = torch.zeros(3, 1, 2, 2)
    q = torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    assert per_sample_mse(fp, q).tolist() == [0.0, 1.0, 4.0]
    with pytest.raises(ValueError, match=r"\(3, 1, 2, 2\).*\(2, 1, 2, 2\)"):
        per_sample_mse(fp, q[:2])


def test_stats_show_what_one_flipped_sample_does_to_the_mean():
    # 99 samples near their FP sample, one that ended on another image: the mean is the outlier's.
    fp = torch.zeros(100, 1, 4, 4)
    q = torch.full((100, 1, 4, 4), 0.01)
    q[7] = 1.0
    stats = sample_error_stats(fp, q, threshold=0.01, labeller=lambda x: (x.mean((1, 2, 3)) > 0.5).long())
    assert stats.median == pytest.approx(1e-4)
    assert stats.mean == pytest.approx((99 * 1e-4 + 1.0) / 100)
    assert stats.share_above == pytest.approx(0.01) and stats.label_change_share == pytest.approx(0.01)
    lo, hi = stats.mean_ci95
    assert lo <= stats.mean <= hi and hi / max(lo, 1e-12) > 2  # one sample: a wide interval, as it should be
    assert stats.p99 > stats.p90 == pytest.approx(1e-4)
    assert stats.as_dict()["mean_ci95"] == [lo, hi]


def test_bootstrap_interval_narrows_with_more_samples():
    gen = torch.Generator().manual_seed(0)
    small = bootstrap_mean_interval(torch.rand(50, generator=gen))
    large = bootstrap_mean_interval(torch.rand(5000, generator=gen))
    assert small[1] - small[0] > 5 * (large[1] - large[0])
    assert large[0] < 0.5 < large[1]
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        bootstrap_mean_interval(torch.ones(1))


def test_paired_comparison():
    gen = torch.Generator().manual_seed(1)
    b = torch.rand(400, generator=gen, dtype=torch.float64) + 0.1
    same = paired_comparison(b, b.clone())
    assert same.ratio == 1 and not same.excludes_one and same.a_lower_share == 0
    half = paired_comparison(b / 2, b)
    assert half.ratio == pytest.approx(0.5) and half.ratio_ci95[1] < 1 and half.excludes_one
    assert half.a_lower_share == 1 and half.median_ratio == pytest.approx(0.5)
    # Noise around B's errors: the interval straddles 1.
    noisy = paired_comparison(b * (1 + 0.1 * torch.randn(400, generator=gen, dtype=torch.float64)), b)
    assert noisy.ratio_ci95[0] < 1 < noisy.ratio_ci95[1] and not noisy.excludes_one
    with pytest.raises(ValueError, match=r"\(400,\) and \(3,\)"):
        paired_comparison(b, b[:3])
