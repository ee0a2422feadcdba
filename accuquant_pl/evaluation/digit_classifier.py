"""A cheap, honest sample-quality figure for the digits teacher: a digit classifier's view of the samples.

This is *not* FID. A logistic-regression classifier trained on the real training digits (8x8) reports how
confidently it reads each sample as some digit, and how evenly the samples cover the ten classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from accuquant_pl.data.digits import digits_tensors


def _features(images: Tensor) -> np.ndarray:
    # The classifier sees the digits at their native 8x8 resolution.
    small = F.adaptive_avg_pool2d(images.float().cpu().clamp(-1, 1), 8)
    return small.flatten(1).numpy()


@dataclass
class DigitQuality:
    confidence: float
    """Mean top-class probability."""
    confident_fraction: float
    """Fraction of images read with probability >= 0.9."""
    class_coverage: float
    """Entropy of the predicted-class histogram over log(10): 1.0 = all ten digits equally often."""


class DigitClassifier:
    """Logistic regression on the real training digits; ``score`` summarises a batch of images."""

    def __init__(self, image_size: int = 16, seed: int = 0) -> None:
        images, labels = digits_tensors(image_size, "train")
        self.model = LogisticRegression(max_iter=2000, C=0.5, random_state=seed)
        self.model.fit(_features(images), labels.numpy())

    def labels(self, images: Tensor) -> Tensor:
        """The digit (0..9) the classifier reads in each image."""
        return torch.from_numpy(self.model.predict(_features(images)))

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return float((self.model.predict(_features(images)) == labels.numpy()).mean())

    def score(self, images: Tensor) -> DigitQuality:
        probs = self.model.predict_proba(_features(images))
        top = probs.max(axis=1)
        hist = np.bincount(probs.argmax(axis=1), minlength=10) / len(probs)
        nz = hist[hist > 0]
        return DigitQuality(
            confidence=float(top.mean()),
            confident_fraction=float((top >= 0.9).mean()),
            class_coverage=float(-(nz * np.log(nz)).sum() / np.log(10)),
        )


def pixel_statistics_gap(samples: Tensor, reference: Tensor) -> float:
    """Mean absolute difference between the per-pixel means of two image sets (a crude distribution check)."""
    return float((samples.float().mean(0) - reference.float().mean(0)).abs().mean())


