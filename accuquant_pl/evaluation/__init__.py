"""Running a finished (FP or quantized) model: ``predict`` (:class:`SampleGeneration`), ``validate`` / ``test``
(:class:`SampleEvaluation`), paired FP-vs-quantized sampling, the sample-quality meter, images and plots."""

from accuquant_pl.evaluation.generation import SampleGeneration
from accuquant_pl.evaluation.module import SampleEvaluation
from accuquant_pl.evaluation.paired import PairedErrors, paired_errors, samples_from
from accuquant_pl.evaluation.quality import SampleQuality, SampleQualityMeter

__all__ = [
    "SampleGeneration",
    "PairedErrors",
    "SampleEvaluation",
    "SampleQuality",
    "SampleQualityMeter",
    "paired_errors",
    "samples_from",
]
