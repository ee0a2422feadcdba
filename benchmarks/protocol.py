"""Set-up shared by the robust-protocol benchmarks (core_ablation, peers, main_comparison, behaviour_fingerprint):
the teacher, its DDIM scheduler, the held-out seeds, the FP reference samples (cached) and the
activation-calibration inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.diffusion.conditioning import ConditioningSpec
from accuquant_pl.diffusion.loading import load_denoiser
from accuquant_pl.evaluation.paired import samples_from
from accuquant_pl.io import atomic_torch_save
from accuquant_pl.metrics.sample_errors import (
    PROTOCOL_BATCH_SIZE,
    PROTOCOL_FIRST_SEED,
    SampleErrorStats,
    per_sample_mse,
    sample_error_stats,
)
from benchmarks import common
from benchmarks.common import REPO, set_threads

DEFAULT_TEACHER = str(REPO / "models" / "digits-ddpm")
TRAJECTORY_CACHE = str(common.TRAJECTORY_CACHE)
FP_CACHE = str(REPO / ".cache" / "protocol" / "fp_samples.pt")


@dataclass
class Protocol:
    """What every row of a protocol benchmark is measured against."""

    teacher: torch.nn.Module
    data: TrajectoryDataModule
    scheduler: Any
    seeds: list[int]
    reference: torch.Tensor
    """The FP teacher's final samples of ``seeds`` (batches of ``PROTOCOL_BATCH_SIZE``)."""
    steps: int
    cond: Any = None
    """A conditional teacher's ``seeds -> Conditioning`` (sample i of class i % 10 for the digits DiT); None."""

    def calibration_batches(self, samples: int) -> list[dict[str, torch.Tensor]]:
        """Forward kwargs of the activation-calibration inputs (the data module's ``calibration_inputs``)."""
        return [{"x": b["x"], "timestep": b["timesteps"][:, 0]} for b in self.data.calibration_inputs(samples)]

    def error_row(self, samples: torch.Tensor, labeller: Any = None) -> tuple[SampleErrorStats, dict[str, Any]]:
        """The per-sample statistics of ``samples`` against the reference, and the JSON row fields they give
        (the statistics plus every sample's error, which paired comparisons between rows need)."""
        stats = sample_error_stats(self.reference, samples, labeller=labeller)
        return stats, {**stats.as_dict(), "per_sample_mse": per_sample_mse(self.reference, samples).tolist()}

    def samples(self, model: torch.nn.Module) -> torch.Tensor:
        """``model``'s final samples of the protocol seeds, in the protocol's batches."""
        with torch.no_grad():
            return samples_from(model, self.scheduler, self.seeds, self.steps, batch_size=PROTOCOL_BATCH_SIZE,
                                cond=self.cond)


def fp_reference(teacher: torch.nn.Module, teacher_path: str, scheduler: Any, seeds: list[int], steps: int,
                 threads: int, cache: str | None, cond: Any = None) -> torch.Tensor:
    """The FP samples of ``seeds``, from ``cache`` when it holds them for the same teacher, seeds, steps, batch and
    thread count (float reduction order, hence a few samples, can depend on the thread count)."""
    key = json.dumps({"teacher": str(Path(teacher_path).resolve()), "seeds": [seeds[0], len(seeds)], "steps": steps,
                      "batch_size": PROTOCOL_BATCH_SIZE, "threads": threads,
                      **({"conditional": True} if cond is not None else {})})
    path = Path(cache) if cache else None
    if path is not None and path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key:
            return cached["samples"]
    with torch.no_grad():
        samples = samples_from(teacher, scheduler, seeds, steps, batch_size=PROTOCOL_BATCH_SIZE, cond=cond)
    if path is not None:
        atomic_torch_save({"key": key, "samples": samples}, path)
    return samples


def setup_protocol(teacher_path: str = DEFAULT_TEACHER, eval_samples: int = 1024, steps: int = 50,
                   num_trajectories: int = 64, threads: int = 1, cache_dir: str = TRAJECTORY_CACHE,
                   fp_cache: str | None = FP_CACHE, conditioning: ConditioningSpec | None = None) -> Protocol:
    """Load the teacher, its FP calibration trajectories and the FP reference samples (with ``threads`` torch threads);
    a conditional teacher samples seed i with ``conditioning``'s rule (``ConditioningSpec.for_samples``)."""
    set_threads(threads)
    teacher = load_denoiser(teacher_path).eval()
    data = TrajectoryDataModule(pretrained=teacher_path, num_inference_steps=steps, num_trajectories=num_trajectories,
                                batch_size=min(16, num_trajectories), cache_dir=cache_dir, conditioning=conditioning)
    data.prepare_data()
    data.setup("fit")
    scheduler = data.make_scheduler()
    seeds = list(range(PROTOCOL_FIRST_SEED, PROTOCOL_FIRST_SEED + eval_samples))
    cond = None if conditioning is None else (lambda chunk: conditioning.for_samples(torch.tensor(chunk)))
    reference = fp_reference(teacher, teacher_path, scheduler, seeds, steps, threads, fp_cache, cond)
    return Protocol(teacher, data, scheduler, seeds, reference, steps, cond)
