"""The calibration data module: FP sampler trajectories sampled once (cached on disk), served as per-step items
(n = 1) or n-step groups (AccuQuant)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import SchedulerMixin
from torch import Tensor
from torch.utils.data import DataLoader

from accuquant_pl.data.batching import ResumableLoader, StartBatchSampler, collate_by_start
from accuquant_pl.data.groups import (
    GroupStarts,
    StartWeighting,
    TrajectoryGroups,
    check_starts_per_batch,
    group_starts,
)
from accuquant_pl.data.plan import EpochPlan
from accuquant_pl.data.trajectory_cache import (
    MANIFEST_FILE,
    CacheError,
    check_cache,
    key_hash,
    read_cache,
    write_cache,
)
from accuquant_pl.diffusion.conditioning import Conditioning, ConditioningSpec
from accuquant_pl.diffusion.hub import resolved_revision
from accuquant_pl.diffusion.loading import inspect_model_folder, load_denoiser, load_scheduler_config
from accuquant_pl.diffusion.noise import check_replayable, is_stochastic
from accuquant_pl.diffusion.sampling import initial_noise, sample
from accuquant_pl.diffusion.schedulers import history_steps, scaled_model_input, scheduler_from_config
from accuquant_pl.io import recover_directory, sha256_tree


@dataclass
class TrajectoryAblations:
    """Research variants of how calibration groups are drawn (docs/results_128_seeds.md); the defaults are the method."""

    group_starts: GroupStarts = "all"
    """'all' start positions, or non-overlapping 'windows'."""
    start_weighting: StartWeighting = "uniform"
    """How group starts are drawn: 'uniform', or 'linear' (more weight late in the schedule)."""

    def __post_init__(self) -> None:
        for name, value, choices in (("group_starts", self.group_starts, ("all", "windows")),
                                     ("start_weighting", self.start_weighting, ("uniform", "linear"))):
            if value not in choices:
                raise ValueError(f"--data.init_args.group_ablations.{name}: unknown value {value!r}; choose one of "
                                 f"{list(choices)}")


def _check_sizes(num_inference_steps: int, num_trajectories: int, batch_size: int, group_size: int,
                 starts: GroupStarts, starts_per_batch: int) -> None:
    """Raise ``ValueError`` naming the argument unless the data module's sizes fit together."""
    for name, value, low in (("num_inference_steps", num_inference_steps, 1), ("num_trajectories", num_trajectories, 1),
                             ("batch_size", batch_size, 1), ("group_size", group_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    # Rejects a group longer than the schedule and an unknown group_starts, naming them.
    num_starts = len(group_starts(num_inference_steps, group_size, starts))
    check_starts_per_batch(starts_per_batch, batch_size, num_starts)
    if num_trajectories < batch_size:
        raise ValueError(f"num_trajectories ({num_trajectories}) is smaller than batch_size ({batch_size}): "
                         "a batch would hold the same trajectory several times; lower batch_size or sample more")


def _same_model(a: str, b: str) -> bool:
    """Whether two ``pretrained`` values name one FP model: equal, or local paths to one folder."""
    return str(a) == str(b) or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


class TrajectoryDataModule(L.LightningDataModule):
    """Samples N FP trajectories once (``prepare_data``, cached on disk) and serves n-step groups from them."""

    def __init__(
        self,
        pretrained: str | None = None,
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        eta: float = 0.0,
        num_trajectories: int = 64,
        seed: int = 0,
        batch_size: int = 16,
        group_size: int = 1,
        starts_per_batch: int = 1,
        conditioning: ConditioningSpec | None = None,
        group_ablations: TrajectoryAblations | None = None,
        keep_model_outputs: bool = True,
        sampling_batch_size: int = 64,
        cache_dir: str = ".cache/trajectories",
        cache_path: str | None = None,
        rebuild: bool = False,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            pretrained: the FP model (folder or ``owner/name[@revision][:subfolder]``); None: the module's.
            scheduler: the diffusers scheduler of the trajectories (and of the AccuQuant rollout): a name in
                ``accuquant_pl.diffusion.scheduler_names()`` (ddim, ddpm, dpmsolver++, sde-dpmsolver++, unipc,
                pndm, euler, euler-ancestral) or a scheduler class's import path (``diffusers.LCMScheduler``).
            num_inference_steps: sampling steps S of each trajectory.
            eta: DDIM eta (0 = deterministic). A stochastic sampler's step noise is drawn per (trajectory seed,
                step), recorded with the cache and replayed by the AccuQuant rollout.
            num_trajectories: N, the number of FP trajectories sampled for calibration.
            seed: trajectory i starts from the noise of seed ``seed + i``.
            batch_size: calibration items per batch (per device under DDP).
            group_size: n, steps per item: 1 = per-step items, n > 1 = AccuQuant groups.
            starts_per_batch: distinct group starts in every batch, each with ``batch_size / starts_per_batch``
                trajectories (it must divide batch_size). 1: a batch is one start (one timestep); more mixes
                the schedule's steps in each optimisation step, which lowers the gradient's variance.
            conditioning: conditional models: trajectory i's class label or prompt, and the guidance
                (:class:`~accuquant_pl.diffusion.ConditioningSpec`; None: unconditional).
            group_ablations: research variants of how groups are drawn (:class:`TrajectoryAblations`).
            keep_model_outputs: store the FP model output of every step (needed by multistep schedulers).
            sampling_batch_size: trajectories sampled per batch in ``prepare_data``.
            cache_dir: folder of caches, one sub-folder per configuration key.
            cache_path: an explicit cache folder (overrides ``cache_dir``); it must match this configuration.
            rebuild: re-sample a cache whose key or checksum does not match instead of failing.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        self.ablations = (group_ablations if isinstance(group_ablations, TrajectoryAblations)
                          else TrajectoryAblations(**(group_ablations or {})))
        _check_sizes(num_inference_steps, num_trajectories, batch_size, group_size, self.ablations.group_starts,
                     starts_per_batch)
        self.pretrained = pretrained  # unset, not a hyperparameter: the logger's merge refuses the module's key twice
        self.save_hyperparameters(ignore=[] if pretrained is not None else ["pretrained"])
        self.hparams["group_ablations"] = asdict(self.ablations) if group_ablations is not None else None
        self.conditioning_spec = ConditioningSpec.of(conditioning)
        # Plain data in the checkpoint, so that it loads with torch.load(weights_only=True).
        self.hparams["conditioning"] = self.conditioning_spec.to_dict() if self.conditioning_spec else None
        self.tensors: dict[str, Tensor] | None = None
        self._stochastic: bool | None = None  # serves_step_noise, probed once the FP model is known
        self.train_set: TrajectoryGroups | None = None

    # ----- what the LightningModule asks for (read, never written by it) -----
    def epoch_plan(self) -> EpochPlan:
        """The trainer's LightningModule's :class:`EpochPlan` (``epoch_plan()``), or the default plan."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        describe = getattr(module, "epoch_plan", None)
        return describe() if callable(describe) else EpochPlan()

    @property
    def model_path(self) -> str:
        """The FP model: ``pretrained``, else the one the LightningModule's plan names (both set: they must agree)."""
        planned = self.epoch_plan().pretrained
        if self.pretrained is not None and planned is not None and not _same_model(self.pretrained, planned):
            raise ValueError(f"data.init_args.pretrained {self.pretrained!r} is not the model being calibrated "
                             f"({planned!r}): the trajectories must come from that FP model; set one of the two")
        path = self.pretrained if self.pretrained is not None else planned
        if path is None:
            raise ValueError("TrajectoryDataModule needs `pretrained` (or a LightningModule whose epoch_plan() names one)")
        return path

    @property
    def group_size(self) -> int:
        return self.hparams.group_size

    def check_group_size(self, group_size: int) -> None:
        """Raise ``ValueError`` unless groups of ``group_size`` steps fit the schedule and the batch."""
        hp = self.hparams
        num_starts = len(group_starts(hp.num_inference_steps, group_size, self.ablations.group_starts))
        check_starts_per_batch(hp.starts_per_batch, hp.batch_size, num_starts)

    def make_scheduler(self) -> SchedulerMixin:
        """A fresh scheduler with the trajectories' timesteps set."""
        sched = scheduler_from_config(self.hparams.scheduler, load_scheduler_config(self.model_path))
        sched.set_timesteps(self.hparams.num_inference_steps)
        return sched

    @property
    def serves_step_noise(self) -> bool:
        """Whether the sampler draws noise in its steps (DDPM, DDIM with eta > 0, ...): the cache then records each
        trajectory's seed and items carry it (``noise_seed``, ``eta``), so the rollout replays that noise."""
        if self._stochastic is None:
            self._stochastic = is_stochastic(self.make_scheduler(), self.hparams.eta)
        return self._stochastic

    def history_length(self) -> int:
        """How many FP steps before a group start prime the sampler there (0 for one-step samplers like DDIM)."""
        return history_steps(self.make_scheduler())

    def sampler_settings(self) -> dict[str, Any]:
        """The sampler the trajectories follow, which the export records for ``quantized_pipeline``."""
        hp = self.hparams
        guidance = self.conditioning_spec.guidance_scale if self.conditioning_spec is not None else 1.0
        return {"scheduler": hp.scheduler, "num_inference_steps": hp.num_inference_steps, "eta": hp.eta,
                "guidance_scale": guidance}

    def cache_key(self) -> dict[str, Any]:
        hp = self.hparams
        folder = inspect_model_folder(self.model_path)
        revision = resolved_revision(self.model_path)
        return {
            "model_sha256": sha256_tree(folder.denoiser_dir),
            **({"model_revision": revision} if revision is not None else {}),  # a Hub id's resolved commit
            "scheduler": hp.scheduler,
            "scheduler_config": folder.scheduler_config,
            "num_inference_steps": hp.num_inference_steps,
            "eta": hp.eta,
            "num_trajectories": hp.num_trajectories,
            "seed": hp.seed,
            **(self.conditioning_spec or ConditioningSpec()).cache_key(),
            "keep_model_outputs": hp.keep_model_outputs,
            # Step noise per (trajectory seed, step) since this version; deterministic caches keep their key.
            **({"step_noise": "per-trajectory-step"} if self.serves_step_noise else {}),
        }

    def cache_folder(self, key: dict[str, Any]) -> Path:
        if self.hparams.cache_path:
            return Path(self.hparams.cache_path)
        return Path(self.hparams.cache_dir) / key_hash(key)[:16]

    # ----- conditioning -----
    def conditioning(self, batch: dict[str, Any]) -> Conditioning | None:
        """The :class:`Conditioning` of a batch of items (None for unconditional models)."""
        spec = self.conditioning_spec
        return spec.for_items(batch, batch["x"].device) if spec is not None else None

    def seed_conditioning(self, seeds: list[int]) -> Conditioning | None:
        """The conditioning of samples numbered ``seeds`` under this data module's rule (class label ``i % len``,
        prompt ``i % P``), on the CPU: what evaluation during calibration (``FIDCallback``) samples with."""
        spec = self.conditioning_spec
        return spec.for_samples(torch.tensor(seeds, dtype=torch.long)) if spec is not None else None

    # ----- LightningDataModule -----
    def prepare_data(self) -> None:
        self._stochastic = check_replayable(self.make_scheduler(), self.hparams.eta)  # serves_step_noise reads it
        key = self.cache_key()
        folder = self.cache_folder(key)
        recover_directory(folder)  # a cache whose replacement was killed half-way is moved back first
        if folder.exists():
            try:
                check_cache(folder, key)
                return
            except CacheError:
                if not self.hparams.rebuild:
                    raise
        write_cache(folder, key, self._sample_trajectories())

    @torch.no_grad()
    def _sample_trajectories(self) -> dict[str, Tensor]:
        hp = self.hparams
        unet = load_denoiser(self.model_path)
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        chunks: dict[str, list[Tensor]] = {"states": [], "model_outputs": [], "class_labels": [], "prompt_index": [],
                                           "noise_seeds": []}
        timesteps = None
        for start in range(0, hp.num_trajectories, hp.sampling_batch_size):
            index = torch.arange(start, min(start + hp.sampling_batch_size, hp.num_trajectories))
            extra = self.conditioning_spec.indices(index) if self.conditioning_spec is not None else {}
            cond = self.conditioning_spec.for_items(extra) if extra else None
            seeds = (hp.seed + index).tolist()
            noise = initial_noise(seeds, (cfg.in_channels, size, size))
            traj = sample(unet, self.make_scheduler(), noise, hp.num_inference_steps, cond=cond, eta=hp.eta,
                          keep_trajectory=True, keep_model_outputs=hp.keep_model_outputs, noise_seeds=seeds)
            if self.serves_step_noise:
                chunks["noise_seeds"].append(torch.tensor(seeds, dtype=torch.long))
            timesteps = traj.timesteps
            chunks["states"].append(traj.states.transpose(0, 1))
            if traj.model_outputs is not None:
                chunks["model_outputs"].append(traj.model_outputs.transpose(0, 1))
            for name, value in extra.items():
                chunks[name].append(value)
        tensors = {name: torch.cat(parts) for name, parts in chunks.items() if parts}
        tensors["timesteps"] = timesteps
        return tensors

    def setup(self, stage: str | None = None) -> None:
        if self.tensors is not None:
            return
        key = self.cache_key()
        folder = self.cache_folder(key)
        if not folder.exists():
            raise CacheError(f"no trajectory cache at {folder}; prepare_data() builds it")
        self.tensors = read_cache(folder, key)
        self._check_ranks_share_cache(folder)
        hp = self.hparams
        self.train_set = TrajectoryGroups(self.tensors, hp.group_size, self.ablations.group_starts,
                                          self.history_length(), hp.eta)
        if len(self.train_set) < hp.batch_size:
            raise ValueError(f"only {len(self.train_set)} calibration items for batch_size {hp.batch_size}")

    def _check_ranks_share_cache(self, folder: Path) -> None:
        # prepare_data builds the cache on one process per node (Lightning's default); every rank then reads
        # it here. Ranks on nodes without a shared filesystem read their own node's copy: make sure all copies
        # hold the same tensors, or the ranks would calibrate on different trajectories.
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return
        local = json.loads((folder / MANIFEST_FILE).read_text())["sha256"]
        first = trainer.strategy.broadcast(local, src=0)
        if local != first:
            raise CacheError(f"rank {trainer.global_rank} read trajectory cache {folder} with sha256 {local[:12]}..., "
                             f"rank 0 read {first[:12]}...: build the cache once on a filesystem every node "
                             "shares (or copy rank 0's cache to every node)")

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.epoch_plan())

    def loader(self, plan: EpochPlan) -> DataLoader:
        """The training loader of ``plan``'s epochs (``train_dataloader`` with the LightningModule's plan)."""
        hp = self.hparams
        for epoch, n in plan.group_sizes.items():
            if epoch < 0:
                raise ValueError(f"EpochPlan.group_sizes: epoch must be >= 0, got {epoch}")
            self.check_group_size(n)
        # Rank and world size of a data-parallel strategy; Lightning also injects a DistributedSampler with
        # the same values into the batch sampler (see StartBatchSampler).
        shard = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        history = self.train_set.history
        epoch_groups = {e: TrajectoryGroups(self.tensors, n, self.ablations.group_starts, history, hp.eta)
                        for e, n in sorted(plan.group_sizes.items()) if n != hp.group_size}
        sampler = StartBatchSampler(self.train_set, hp.batch_size, plan.batches_per_epoch or self.steps_per_epoch,
                                    self.ablations.start_weighting, seed=hp.seed, num_replicas=shard.get("num_replicas", 1),
                                    rank=shard.get("rank", 0), starts_per_batch=hp.starts_per_batch,
                                    epoch_groups=epoch_groups)
        return ResumableLoader(sampler.loader_dataset(), batch_sampler=sampler, num_workers=hp.num_workers,
                               collate_fn=collate_by_start)

    def calibration_inputs(self, num_samples: int, seed: int = 0) -> list[dict[str, Any]]:
        """Model inputs (x_k, t_k, conditioning) drawn over all steps, to initialise activation quantizers.

        ``x`` is what the sampler feeds the network at its step (``scale_model_input``), so that activation
        ranges come from the inputs the network sees when sampling."""
        per_step = TrajectoryGroups(self.tensors, 1, "all")
        scheduler = self.make_scheduler()
        gen = torch.Generator().manual_seed(seed)
        picks = torch.randperm(len(per_step), generator=gen)[:num_samples].tolist()
        batches = []
        bs = self.hparams.batch_size
        for start in range(0, len(picks), bs):
            items = [per_step[p] for p in picks[start : start + bs]]
            for item in items:
                item["x"] = scaled_model_input(scheduler, item["step_index"], item["x"])
            batch = torch.utils.data.default_collate(items)
            batches.append(batch)
        return batches

    @property
    def steps_per_epoch(self) -> int:
        return math.floor(len(self.train_set) / self.hparams.batch_size)
