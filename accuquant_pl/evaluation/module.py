"""``validate`` / ``test``: sample quality of a quantized (or the FP) model against FP and real data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from accuquant_pl.calibration.checkpoint import is_calibration_checkpoint
from accuquant_pl.calibration.module import BlockReconstruction
from accuquant_pl.diffusion.conditioning import Conditioning, ConditioningSpec
from accuquant_pl.diffusion.loading import load_denoiser
from accuquant_pl.evaluation.digit_classifier import DigitClassifier
from accuquant_pl.evaluation.generation import SampleGeneration
from accuquant_pl.evaluation.images import save_png, side_by_side
from accuquant_pl.evaluation.paired import paired_errors, samples_from
from accuquant_pl.evaluation.plots import plot_error_curves
from accuquant_pl.evaluation.quality import SampleQualityMeter
from accuquant_pl.io import atomic_write_json
from accuquant_pl.metrics.sample_errors import sample_error_stats


class SampleEvaluation(SampleGeneration):
    """Samples one image per seed of the data module with the evaluated model and with the FP teacher from
    the same noise, then reports FID vs real held-out data, FID2FP32, KID, pixel MSE/PSNR vs FP, the FID
    noise floor, the per-sample statistics of the robust protocol (mean with a bootstrap 95 % interval, median,
    p90/p99, share above ``error_threshold``, share of changed digits) and the per-step / accumulated error
    curves (TensorBoard, a JSON file and a PNG plot).

    The model is the ``quantized`` folder, the calibration checkpoint given by ``--ckpt_path`` (converted in
    ``on_load_checkpoint``), or, with neither, the FP teacher itself (a sanity row: MSE 0, FID2FP32 0).
    """

    converts_calibration_checkpoints = True  # tells AccuQuantCLI to keep this model config under --ckpt_path

    def __init__(
        self,
        pretrained: str = "models/digits-ddpm",
        quantized: str | None = None,
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        eta: float = 0.0,
        conditioning: ConditioningSpec | None = None,
        features: str = "inception",
        real_dataset: str | None = "digits",
        kid: bool = True,
        noise_floor_seed_offset: int = 10_000_000,
        stats_cache_dir: str | None = ".cache/fid_stats",
        output_dir: str | None = "outputs/evaluation",
        digit_labels: bool = False,
        error_threshold: float = 0.01,
        onnx_threads: int | None = None,
    ) -> None:
        """
        Args:
            pretrained: the FP diffusers model (folder or Hub id) the samples are paired with.
            quantized: a quantized model folder (or its ONNX export, run in ONNX Runtime) to evaluate; without it
                (and without --ckpt_path) the FP model.
            scheduler: the diffusers scheduler to sample with: a name in
                ``accuquant_pl.diffusion.scheduler_names()`` or an import path.
            num_inference_steps: denoising steps.
            eta: DDIM eta (0 = deterministic).
            conditioning: conditional models: the class label or prompt of the samples of seed s (FP and evaluated
                alike) and the guidance (:class:`~accuquant_pl.diffusion.ConditioningSpec`).
            features: FID features: 'inception' (standard FID Inception-v3), 'random-projection' (cheap, not
                perceptual) or the path of a TorchScript extractor.
            real_dataset: real reference images: 'digits' (held-out split) or a .pt file; null skips FID/KID vs real.
            kid: also compute KID against the real images.
            noise_floor_seed_offset: the noise-floor FP set uses seeds shifted by this (disjoint from the test seeds).
            stats_cache_dir: cache of real-data FID statistics.
            output_dir: where metrics.json, error_curves.png and samples.png go (null: no files).
            digit_labels: also report the share of samples whose digit (the shipped digit classifier's reading)
                differs from their FP sample's (digits models only).
            error_threshold: per-sample final MSE above which a sample counts as departed from its FP sample.
            onnx_threads: ONNX Runtime's intra-op threads when ``quantized`` is an ONNX export folder.
        """
        super().__init__(pretrained, quantized, scheduler, num_inference_steps, eta, conditioning, decode=True,
                         onnx_threads=onnx_threads)
        self.teacher = load_denoiser(pretrained) if quantized is not None else None
        self.meter: SampleQualityMeter | None = None
        self._classifier: DigitClassifier | None = None
        self._reset()

    def _reset(self) -> None:
        self._q: list[Tensor] = []
        self._fp: list[Tensor] = []
        self._fp_other: list[Tensor] = []
        self._per_step = torch.zeros(self.hparams.num_inference_steps, dtype=torch.float64)
        self._accumulated = torch.zeros_like(self._per_step)

    # A calibration checkpoint holds a BlockReconstruction; evaluate its student instead of loading it as ours.
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not is_calibration_checkpoint(checkpoint):
            raise ValueError("--ckpt_path must be a calibration checkpoint written by BlockReconstruction")
        if self.teacher is None:
            self.teacher = load_denoiser(self.hparams.pretrained)
        self.unet = BlockReconstruction.student_from_checkpoint(checkpoint, pretrained=self.hparams.pretrained)
        checkpoint["state_dict"] = self.state_dict()

    def _fp_model(self) -> torch.nn.Module:
        return self.teacher if self.teacher is not None else self.unet

    def _seed_conditioning(self, seeds: list[int]) -> Conditioning | None:
        return self.conditioning(torch.tensor(seeds))

    def _step(self, seeds: Tensor) -> None:
        # Conditional models sample seed s with its class label / prompt (``conditioning``), FP and quantized
        # alike; a latent model's error curves stay in latent space, its samples are decoded before the metrics.
        fp_model, hp = self._fp_model(), self.hparams
        errors = paired_errors(fp_model, self.unet, self.scheduler, seeds.tolist(), hp.num_inference_steps,
                               cond=self._seed_conditioning, decode=self.decode, eta=hp.eta)
        n = len(seeds)
        self._per_step += torch.tensor(errors.per_step, dtype=torch.float64) * n
        self._accumulated += torch.tensor(errors.accumulated, dtype=torch.float64) * n
        self._q.append(errors.q_samples)
        self._fp.append(errors.fp_samples)
        other = (seeds + hp.noise_floor_seed_offset).tolist()
        self._fp_other.append(samples_from(fp_model, self.scheduler, other, hp.num_inference_steps,
                                           cond=self._seed_conditioning, decode=self.decode, eta=hp.eta))

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._step(batch)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._step(batch)

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish("val")
        self._reset()

    def _per_sample_figures(self, fp: Tensor, q: Tensor) -> dict[str, float]:
        """The robust protocol's per-sample statistics (docs/results.md): a few samples whose trajectory flips
        carry most of the mean, so the median, tail and shares are reported next to it."""
        hp = self.hparams
        if hp.digit_labels and self._classifier is None:
            self._classifier = DigitClassifier(image_size=q.shape[-1])
        stats = sample_error_stats(fp, q, hp.error_threshold, self._classifier.labels if hp.digit_labels else None)
        figures = {"mse_mean_ci_low": stats.mean_ci95[0], "mse_mean_ci_high": stats.mean_ci95[1],
                   "mse_median": stats.median, "mse_p90": stats.p90, "mse_p99": stats.p99,
                   "share_above_threshold": stats.share_above}
        if stats.label_change_share is not None:
            figures["digit_changed"] = stats.label_change_share
        return figures

    def _gather(self, parts: list[Tensor]) -> Tensor:
        local = torch.cat(parts)
        if self.trainer.world_size == 1:
            return local
        return self.all_gather(local).flatten(0, 1).cpu()

    def _finish(self, stage: str) -> None:
        q, fp, fp_other = self._gather(self._q), self._gather(self._fp), self._gather(self._fp_other)
        n = len(q)
        per_step = self.trainer.strategy.reduce(self._per_step.to(self.device), reduce_op="sum").cpu() / n
        accumulated = self.trainer.strategy.reduce(self._accumulated.to(self.device), reduce_op="sum").cpu() / n
        hp = self.hparams
        if self.meter is None:
            size = q.shape[-1]  # the images' size (a latent model's decoded size, not its latents')
            self.meter = SampleQualityMeter(hp.features, hp.real_dataset, size, hp.stats_cache_dir, hp.kid)
        quality = self.meter.measure(q, fp, fp_other if len(fp_other) >= 2 else None)
        figures = {k: v for k, v in quality.as_dict().items() if v is not None}
        figures.update(self._per_sample_figures(fp, q))
        self.log_dict({f"{stage}/{k}": float(v) for k, v in figures.items()}, rank_zero_only=True, sync_dist=False)
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image(f"{stage}/fp_vs_model", side_by_side(fp, q), global_step=self.global_step)
            for k, (a, b) in enumerate(zip(per_step.tolist(), accumulated.tolist(), strict=True)):
                experiment.add_scalars(f"{stage}/error_per_step", {"per_step": a, "accumulated": b}, k)
        if hp.output_dir and self.trainer.is_global_zero:
            out = Path(hp.output_dir)
            model = hp.quantized or ("calibration checkpoint" if self.teacher is not None else "fp")
            atomic_write_json(out / "metrics.json", {"model": model, "stage": stage, "settings": dict(hp), **figures,
                                                     "per_step": per_step.tolist(),
                                                     "accumulated": accumulated.tolist()})
            plot_error_curves({str(model): (per_step.tolist(), accumulated.tolist())}, out / "error_curves.png")
            save_png(side_by_side(fp[:32], q[:32]), out / "samples.png")
        self._reset()

