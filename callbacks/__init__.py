"""Lightning callbacks of accuquant-pl (usable in any ``lightning.Trainer``, and in YAML as ``callbacks.<Name>``)."""

from callbacks.checkpoint import AtomicCheckpointIO, CalibrationCheckpoint
from callbacks.diffusers_export import ExportDiffusers
from callbacks.fid import FIDCallback
from callbacks.quantized_export import ExportQuantized
from callbacks.sample_grid import SampleGrid
from callbacks.sample_writer import SampleWriter
from callbacks.unit_progress import UnitProgressBar

__all__ = [
    "AtomicCheckpointIO",
    "CalibrationCheckpoint",
    "ExportDiffusers",
    "ExportQuantized",
    "FIDCallback",
    "SampleGrid",
    "SampleWriter",
    "UnitProgressBar",
]
