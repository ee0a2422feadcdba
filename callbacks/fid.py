"""FID and FP-vs-quantized sample grids during a calibration, every few units and at the end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from accuquant_pl.diffusion.conditioning import Conditioning
from accuquant_pl.diffusion.loading import load_denoiser, load_vae
from accuquant_pl.diffusion.sampling import decode_latents
from accuquant_pl.evaluation.images import save_png, side_by_side
from accuquant_pl.evaluation.paired import samples_from
from accuquant_pl.evaluation.quality import SampleQualityMeter
from accuquant_pl.host_memory import release_freed_memory


class FIDCallback(L.Callback):
    """Samples the student as calibrated so far (finished units quantized, later ones as the module runs them)
    and the FP teacher from the same seeds, logs FID / FID2FP32 / MSE to the logger, a side-by-side grid as a
    TensorBoard image, and saves the grid as a PNG. Runs on rank 0 only, after every ``every_n_units`` units
    and once at the end on the finalized model; the global RNG is left untouched so a resumed calibration
    stays identical to an uninterrupted one. Its history is part of the checkpoint.
    """

    def __init__(
        self,
        every_n_units: int = 5,
        num_samples: int = 64,
        num_inference_steps: int = 20,
        first_seed: int = 200_000,
        features: str = "inception",
        real_dataset: str | None = "digits",
        stats_cache_dir: str | None = ".cache/fid_stats",
        output_dir: str | None = None,
    ) -> None:
        """
        Args:
            every_n_units: evaluate after every this many calibrated units (0: only at the end).
            num_samples: samples per evaluation (cheap: FID at small counts is biased upwards, compare runs
                at equal counts).
            num_inference_steps: DDIM steps of the evaluation sampler.
            first_seed: seeds first_seed .. first_seed + num_samples - 1 (keep them disjoint from calibration).
            features: 'inception', 'random-projection' or a TorchScript path (see SampleEvaluation).
            real_dataset: 'digits', a .pt file of real images in [-1, 1], or null to skip FID vs real.
            stats_cache_dir: cache of real-data FID statistics.
            output_dir: PNG grids go here (default: <default_root_dir>/fid).
        """
        if every_n_units < 0:
            raise ValueError(f"every_n_units must be >= 0, got {every_n_units}")
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 for a covariance, got {num_samples}")
        self.every_n_units = every_n_units
        self.num_samples = num_samples
        self.num_inference_steps = num_inference_steps
        self.first_seed = first_seed
        self.features = features
        self.real_dataset = real_dataset
        self.stats_cache_dir = stats_cache_dir
        self.output_dir = output_dir
        self.history: list[dict[str, Any]] = []
        self._meter: SampleQualityMeter | None = None
        self._fp: torch.Tensor | None = None
        self._decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        names = getattr(pl_module, "epoch_names", None) or getattr(pl_module, "unit_names", [])
        last = done >= len(names) or done >= (trainer.max_epochs or 0)
        if self.every_n_units and done % self.every_n_units == 0 and not last:
            self._evaluate(trainer, pl_module, f"unit_{done:03d}", done)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.finalize()
        self._evaluate(trainer, pl_module, "final", len(pl_module.done_units))

    @rank_zero_only
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str, units_done: int) -> None:
        seeds = list(range(self.first_seed, self.first_seed + self.num_samples))
        datamodule = trainer.datamodule
        scheduler = datamodule.make_scheduler()
        device = pl_module.device

        def cond(chunk: list[int]) -> Conditioning | None:  # conditional models: the data module's labels / prompts
            c = datamodule.seed_conditioning(chunk) if hasattr(datamodule, "seed_conditioning") else None
            return c.to(device) if c is not None else None

        release_freed_memory()  # the phase before (the final stage's graphs) freed memory sampling cannot reuse
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if self._fp is None:
                pretrained = pl_module.hparams.pretrained
                teacher = load_denoiser(pretrained).to(device)
                vae = load_vae(pretrained)  # latent models: FID on decoded images; the autoencoder stays FP
                if vae is not None:
                    vae.to(device)
                    self._decode = lambda z: decode_latents(vae, z)
                self._fp = samples_from(teacher, scheduler, seeds, self.num_inference_steps, cond=cond,
                                        decode=self._decode)
            q = samples_from(pl_module.student, scheduler, seeds, self.num_inference_steps, cond=cond,
                             decode=self._decode)
            if self._meter is None:
                size = self._fp.shape[-1]
                self._meter = SampleQualityMeter(self.features, self.real_dataset, size, self.stats_cache_dir, kid=False)
            quality = self._meter.measure(q, self._fp)
        figures = {k: float(v) for k, v in quality.as_dict().items() if v is not None and k != "num_samples"}
        self.history.append({"tag": tag, "units_done": units_done, **figures})
        grid = side_by_side(self._fp, q)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"fid/{k}": v for k, v in figures.items()}, step=units_done)
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("fid/fp_vs_quantized", grid, global_step=units_done)
        folder = Path(self.output_dir or Path(trainer.default_root_dir) / "fid")
        save_png(grid, folder / f"{tag}.png")
