"""Per-sample error statistics of a quantized sampler against FP from the same noises, and paired comparisons.

Final-sample MSE over a set of seeds is dominated by the few samples whose trajectory flips to another image
(on the digits teacher, one sample of 128 can carry most of the mean), so a mean alone is not evidence. These
statistics report the whole distribution: mean with a bootstrap 95 % interval, median, p90 / p99, the share of
samples further than ``threshold`` from their FP sample and, with a classifier, the share whose class changes.
Two methods are compared *paired* (the same seeds): the ratio of their means with a bootstrap interval over
seeds, so a comparison says whether its interval excludes 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

PROTOCOL_FIRST_SEED = 100_000
"""The held-out evaluation seeds are ``PROTOCOL_FIRST_SEED, PROTOCOL_FIRST_SEED + 1, ...`` (calibration uses 0..)."""
PROTOCOL_NUM_SAMPLES = 1024
"""Seeds per evaluation: few flipped samples carry the mean, so fewer seeds give means that move by tens of %."""
PROTOCOL_BATCH_SIZE = 64
"""Samples drawn per sampler batch. Fixed because a quantized model's samples depend on the batch they are drawn
in: float rounding that differs with the batch size flips quantization decisions and the sampler amplifies them
(the same seeds in batches of 64 and 32 differ by up to 1.1 per sample for a quantized model, 7e-6 for FP)."""

Labeller = Callable[[Tensor], Tensor]
"""Class labels (N,) of images (N, C, H, W); e.g. the shipped digit classifier's ``predict``."""


def per_sample_mse(fp_samples: Tensor, q_samples: Tensor) -> Tensor:
    """MSE of every quantized sample against its FP sample: float64 (N,)."""
    if fp_samples.shape != q_samples.shape:
        raise ValueError(f"FP samples {tuple(fp_samples.shape)} and quantized samples {tuple(q_samples.shape)} "
                         "must have the same shape")
    return (q_samples.double() - fp_samples.double()).pow(2).flatten(1).mean(1)


def _bootstrap_indices(n: int, resamples: int, seed: int) -> Tensor:
    return torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def bootstrap_mean_interval(values: Tensor, resamples: int = 2000, level: float = 0.95,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling the samples)."""
    if values.numel() < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 values, got {values.numel()}")
    means = values.double()[_bootstrap_indices(values.numel(), resamples, seed)].mean(1)
    tail = (1 - level) / 2
    return float(means.quantile(tail)), float(means.quantile(1 - tail))


@dataclass
class SampleErrorStats:
    """The distribution of per-sample final MSE vs FP over a set of seeds."""

    num_samples: int
    mean: float
    mean_ci95: tuple[float, float]
    """Percentile-bootstrap 95 % interval of the mean over samples."""
    median: float
    p90: float
    p99: float
    threshold: float
    share_above: float
    """Share of samples whose MSE vs their FP sample exceeds ``threshold``."""
    label_change_share: float | None
    """Share of samples the classifier labels differently from their FP sample (None without a classifier)."""

    def as_dict(self) -> dict[str, float | int | list[float] | None]:
        out = asdict(self)
        out["mean_ci95"] = list(self.mean_ci95)
        return out


def sample_error_stats(fp_samples: Tensor, q_samples: Tensor, threshold: float = 0.01,
                       labeller: Labeller | None = None, resamples: int = 2000, seed: int = 0) -> SampleErrorStats:
    """:class:`SampleErrorStats` of ``q_samples`` against ``fp_samples`` (same seeds, same order)."""
    errors = per_sample_mse(fp_samples, q_samples)
    label_change = None
    if labeller is not None:
        label_change = float((labeller(fp_samples) != labeller(q_samples)).double().mean())
    q = errors.quantile(torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return SampleErrorStats(
        num_samples=errors.numel(), mean=float(errors.mean()),
        mean_ci95=bootstrap_mean_interval(errors, resamples, seed=seed),
        median=float(q[0]), p90=float(q[1]), p99=float(q[2]), threshold=threshold,
        share_above=float((errors > threshold).double().mean()), label_change_share=label_change)


@dataclass
class PairedComparison:
    """Method A against method B on the same seeds: ``ratio`` = mean error of A / mean error of B."""

    mean_a: float
    mean_b: float
    ratio: float
    ratio_ci95: tuple[float, float]
    """Percentile-bootstrap 95 % interval of the ratio, resampling seeds (pairs stay together)."""
    median_ratio: float
    a_lower_share: float
    """Share of seeds on which A's error is below B's."""

    @property
    def excludes_one(self) -> bool:
        """True when the interval lies entirely on one side of 1 (the difference is not resampling noise)."""
        return self.ratio_ci95[1] < 1 or self.ratio_ci95[0] > 1

    def as_dict(self) -> dict[str, float | bool | list[float]]:
        out = asdict(self)
        out["ratio_ci95"] = list(self.ratio_ci95)
        out["excludes_one"] = self.excludes_one
        return out


def paired_comparison(errors_a: Tensor, errors_b: Tensor, resamples: int = 2000, level: float = 0.95,
                      seed: int = 0) -> PairedComparison:
    """Compare per-sample errors of two methods on the same seeds (``per_sample_mse`` of each)."""
    if errors_a.shape != errors_b.shape or errors_a.dim() != 1:
        raise ValueError(f"paired errors need two (N,) tensors of one length, got {tuple(errors_a.shape)} and "
                         f"{tuple(errors_b.shape)}")
    a, b = errors_a.double(), errors_b.double()
    if float(b.mean()) <= 0:
        raise ValueError("method B has zero error on every sample: the ratio is undefined")
    idx = _bootstrap_indices(a.numel(), resamples, seed)
    ratios = a[idx].mean(1) / b[idx].mean(1).clamp_min(torch.finfo(torch.float64).tiny)
    tail = (1 - level) / 2
    return PairedComparison(
        mean_a=float(a.mean()), mean_b=float(b.mean()), ratio=float(a.mean() / b.mean()),
        ratio_ci95=(float(ratios.quantile(tail)), float(ratios.quantile(1 - tail))),
        median_ratio=float(a.median() / b.median()) if float(b.median()) > 0 else float("inf"),
        a_lower_share=float((a < b).double().mean()))
