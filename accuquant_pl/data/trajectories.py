"""FP sampler trajectories as calibration data: per-step items (n = 1) and n-step groups (AccuQuant)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from diffusers import SchedulerMixin
from torch import Tensor
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

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
from accuquant_pl.diffusion.loading import inspect_model_folder, load_scheduler_config, load_unet
from accuquant_pl.diffusion.sampling import initial_noise, sample
from accuquant_pl.diffusion.schedulers import history_steps, scaled_model_input, scheduler_from_config
from accuquant_pl.io import recover_directory, sha256_tree

GroupStarts = Literal["all", "windows"]
StartWeighting = Literal["uniform", "linear"]


def group_starts(num_steps: int, group_size: int, starts: GroupStarts) -> list[int]:
    """Step indices j at which an n-step group can start: input states[j], target states[j + n]."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if group_size > num_steps:
        raise ValueError(f"group_size {group_size} is larger than the schedule ({num_steps} steps)")
    if starts == "all":
        return list(range(num_steps - group_size + 1))
    if starts == "windows":
        return list(range(0, num_steps - group_size + 1, group_size))
    raise ValueError(f"unknown group_starts {starts!r}; choose 'all' or 'windows'")


# TrajectoryDataModule's ``group_starts`` argument shadows the function inside its ``__init__``.
_group_starts = group_starts


def check_starts_per_batch(starts_per_batch: int, batch_size: int, num_starts: int) -> None:
    """A batch splits into ``starts_per_batch`` equal sub-batches at distinct starts, of ``num_starts``."""
    if starts_per_batch < 1 or batch_size % starts_per_batch:
        raise ValueError(f"starts_per_batch must be >= 1 and divide batch_size {batch_size}, got {starts_per_batch}")
    if starts_per_batch > num_starts:
        raise ValueError(f"starts_per_batch {starts_per_batch} exceeds the {num_starts} group starts of the schedule")


class TrajectoryGroups(Dataset):
    """Item (trajectory i, start j): x = states[i, j], the n timesteps from j, target = states[i, j + n]."""

    def __init__(self, tensors: dict[str, Tensor], group_size: int = 1, starts: GroupStarts = "all",
                 history: int = 0) -> None:
        self.states, self.timesteps = tensors["states"], tensors["timesteps"]
        self.outputs = tensors.get("model_outputs")
        self.class_labels = tensors.get("class_labels")
        self.prompt_index = tensors.get("prompt_index")
        self.group_size, self.history = group_size, history
        if history and self.outputs is None:
            raise ValueError("a multistep history needs the FP model outputs in the cache (keep_model_outputs)")
        num_steps = len(self.timesteps)
        self.starts = group_starts(num_steps, group_size, starts)
        self.index = [(i, j) for i in range(self.states.shape[0]) for j in self.starts]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Any]:
        i, j = self.index[item]
        n = self.group_size
        out: dict[str, Any] = {
            "x": self.states[i, j],
            "target": self.states[i, j + n],
            "targets": self.states[i, j + 1 : j + n + 1],
            "timesteps": self.timesteps[j : j + n],
            "step_index": j,
            "trajectory": i,
        }
        if self.class_labels is not None:
            out["class_labels"] = self.class_labels[i]
        if self.prompt_index is not None:
            out["prompt_index"] = self.prompt_index[i]
        if self.history:
            # FP inputs and outputs of the (up to `history`) steps before j: a multistep sampler is primed from
            # them at the group start (calibration/scheduler_state.py). Items of a batch share j, so they collate.
            take = min(j, self.history)
            out["history_states"] = self.states[i, j - take : j]
            out["history_outputs"] = self.outputs[i, j - take : j]
        return out

    def start_weights(self, weighting: StartWeighting) -> Tensor:
        """How often each of ``starts`` is drawn, relatively (``StartBatchSampler``)."""
        starts = torch.tensor(self.starts, dtype=torch.float32)
        if weighting == "uniform":
            return torch.ones_like(starts)
        if weighting == "linear":
            # Later starts (closer to the image) get more weight: that is where the sample's details settle.
            return 1.0 + starts
        raise ValueError(f"unknown start_weighting {weighting!r}; choose 'uniform' or 'linear'")


class EpochIndices(Sampler[int]):
    """``range(length)`` that keeps the epoch it is given: Lightning calls ``set_epoch`` on a batch sampler's
    ``sampler`` (as on a ``DistributedSampler``), never on the batch sampler itself."""

    def __init__(self, length: int) -> None:
        self.length, self.epoch = length, 0

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.length))

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class StartBatchSampler(BatchSampler):
    """Batches of distinct trajectories at ``starts_per_batch`` distinct group starts (drawn weighted), in
    ``starts_per_batch`` equal consecutive sub-batches, one per start.

    Sharing the start within a sub-batch lets the sampler's scalar-timestep ``step`` roll it out at once
    (``collate_by_start`` hands the sub-batches over separately); more than one start per batch mixes the
    schedule's steps in every optimisation step, as Q-Diffusion's random (x_t, t) batches do.
    Seeded by ``seed`` alone: every epoch (every unit of the calibration module) draws the same sequence of
    starts and trajectories, and a resumed run draws what an uninterrupted one does. The epoch, which
    Lightning hands to ``sampler.set_epoch`` before every epoch (``EpochIndices`` by default), only decides
    which groups an epoch draws from:

    ``epoch_groups`` gives particular epochs their own groups (another group size n, e.g. the calibration
    module's final stage); their items follow ``groups``' in the loader's dataset, in the dict's order
    (``loader_dataset``). Every other epoch draws exactly as without them.

    Data-parallel runs (``num_replicas`` ranks): every rank draws the same global batch of
    ``batch_size * num_replicas`` distinct trajectories at the same starts and keeps its own contiguous slice
    of each sub-batch, so the ranks see different items, the same starts and the same number of batches,
    and together they see exactly the batch that one process with ``batch_size * num_replicas`` would.
    Under a Lightning data-parallel strategy the rank and world size come from the ``DistributedSampler``
    that Lightning injects through ``sampler`` (that is why this is a ``BatchSampler``); only its
    ``num_replicas`` and ``rank`` are read.
    """

    def __init__(self, groups: TrajectoryGroups, batch_size: int, num_batches: int,
                 weighting: StartWeighting = "uniform", seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 sampler: Iterable[int] | None = None, starts_per_batch: int = 1,
                 epoch_groups: dict[int, TrajectoryGroups] | None = None) -> None:
        if isinstance(sampler, DistributedSampler):
            num_replicas, rank = sampler.num_replicas, sampler.rank
        super().__init__(sampler if sampler is not None else EpochIndices(len(groups)), batch_size, drop_last=False)
        self.groups, self.batch_size, self.num_batches, self.seed = groups, batch_size, num_batches, seed
        self.epoch_groups = dict(epoch_groups or {})
        self.num_replicas, self.rank = num_replicas, rank
        num_trajectories = groups.states.shape[0]
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if batch_size * num_replicas > num_trajectories:
            per = f" ({batch_size} per device x {num_replicas} devices)" if num_replicas > 1 else ""
            raise ValueError(f"batch_size {batch_size * num_replicas}{per} exceeds the {num_trajectories} "
                             "trajectories")
        for some in (groups, *self.epoch_groups.values()):
            check_starts_per_batch(starts_per_batch, batch_size, len(some.starts))
        self.starts_per_batch = starts_per_batch
        groups.start_weights(weighting)  # names an unknown weighting now, not at the first batch
        self.weighting = weighting
        self.skip = 0
        """Batches the next iteration draws but does not yield (a resumed epoch's batches already trained on)."""

    def loader_dataset(self) -> Dataset:
        """The dataset this sampler's indices address: ``groups``, then each of ``epoch_groups``."""
        if not self.epoch_groups:
            return self.groups
        return ConcatDataset([self.groups, *self.epoch_groups.values()])

    def _epoch_groups(self) -> tuple[TrajectoryGroups, int]:
        """The groups this epoch draws from and their first index in ``loader_dataset``."""
        offset = len(self.groups)
        for epoch, groups in self.epoch_groups.items():
            if epoch == self.epoch:
                return groups, offset
            offset += len(groups)
        return self.groups, 0

    @property
    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def set_epoch(self, epoch: int) -> None:
        """What Lightning does before every epoch (through ``sampler``), for use outside a Trainer."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003)
        groups, offset = self._epoch_groups()
        num_starts, num_traj = len(groups.starts), groups.states.shape[0]
        weights = groups.start_weights(self.weighting)
        m = self.starts_per_batch
        sub = self.batch_size // m  # this rank's items per start
        skip, self.skip = self.skip, 0
        for b in range(self.num_batches):
            # Skipped batches are still drawn, so that the ones after them are the uninterrupted run's.
            starts = torch.multinomial(weights, m, generator=gen)  # distinct (without replacement)
            order = torch.randperm(num_traj, generator=gen)
            if b < skip:
                continue
            batch = []
            for c, s in enumerate(starts.tolist()):
                first = (c * self.num_replicas + self.rank) * sub
                batch += [offset + int(i) * num_starts + s for i in order[first : first + sub]]
            yield batch


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`StartBatchSampler` that resumes inside an epoch.

    Lightning saves ``state_dict()`` of such a loader in every checkpoint and hands it back through
    ``load_state_dict`` on resume. The state is the epoch and the number of batches this loader has handed out
    in it; the first pass after a resume into that same epoch skips those batches, so a run killed after a
    mid-epoch checkpoint continues with the batch the uninterrupted run would have drawn next. A resume into
    another epoch (from an end-of-epoch checkpoint) starts that epoch from its first batch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch, self._served = 0, 0
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first batch, after Lightning set the epoch on the sampler.
        sampler = self.batch_sampler
        epoch = sampler.epoch
        resume, self._resume_at = self._resume_at, None
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        sampler.skip = skip
        self._epoch, self._served = epoch, skip
        for batch in super().__iter__():
            self._served += 1  # counted before the yield: a checkpoint taken after this batch includes it
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            self._resume_at = (int(state["epoch"]), int(state["served"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"calibration data loader state {state!r} is not one ResumableLoader wrote") from err


def collate_by_start(items: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
    """Collate a batch of ``StartBatchSampler``: one batch dict when its items share their group start, else
    a list of batch dicts, one per run of items with one start (the objectives take them one at a time)."""
    runs: list[list[dict[str, Any]]] = []
    for item in items:
        if runs and runs[-1][0]["step_index"] == item["step_index"]:
            runs[-1].append(item)
        else:
            runs.append([item])
    batches = [torch.utils.data.default_collate(run) for run in runs]
    return batches[0] if len(batches) == 1 else batches


def sub_batches(batch: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The single-start batches of a (possibly mixed-start) batch from ``collate_by_start``."""
    return list(batch) if isinstance(batch, (list, tuple)) else [batch]


class TrajectoryDataModule(L.LightningDataModule):
    """Samples N FP trajectories once (``prepare_data``, cached on disk) and serves n-step groups from them."""

    def __init__(
        self,
        teacher: str | None = None,
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        eta: float = 0.0,
        num_trajectories: int = 64,
        seed: int = 0,
        batch_size: int = 16,
        group_size: int = 1,
        group_starts: GroupStarts = "all",
        start_weighting: StartWeighting = "uniform",
        starts_per_batch: int = 1,
        conditioning: ConditioningSpec | None = None,
        keep_model_outputs: bool = True,
        sampling_batch_size: int = 64,
        cache_dir: str = ".cache/trajectories",
        cache_path: str | None = None,
        rebuild: bool = False,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            teacher: FP model folder; None takes the LightningModule's ``pretrained``.
            scheduler: diffusers sampler of the trajectories (and of the AccuQuant rollout): a name in
                ``accuquant_pl.diffusion.sampling.SCHEDULERS`` (ddim, ddpm, dpmsolver++, unipc, pndm, euler).
            num_inference_steps: sampling steps S of each trajectory.
            eta: DDIM eta (0 = deterministic).
            num_trajectories: N, the number of FP trajectories sampled for calibration.
            seed: trajectory i starts from the noise of seed ``seed + i``.
            batch_size: calibration items per batch (per device under DDP).
            group_size: n, steps per item: 1 = per-step items, n > 1 = AccuQuant groups.
            group_starts: 'all' start positions or non-overlapping 'windows'.
            start_weighting: how group starts are drawn: 'uniform', or 'linear' (more weight late in the schedule).
            starts_per_batch: distinct group starts in every batch, each with ``batch_size / starts_per_batch``
                trajectories (it must divide batch_size). 1: a batch is one start (one timestep); more mixes
                the schedule's steps in each optimisation step, which lowers the gradient's variance.
            conditioning: conditional models: trajectory i's class label or prompt, and the guidance
                (:class:`~accuquant_pl.diffusion.ConditioningSpec`; None: unconditional).
            keep_model_outputs: store the FP model output of every step (needed by multistep schedulers).
            sampling_batch_size: trajectories sampled per batch in ``prepare_data``.
            cache_dir: folder of caches, one sub-folder per configuration key.
            cache_path: an explicit cache folder (overrides ``cache_dir``); it must match this configuration.
            rebuild: re-sample a cache whose key or checksum does not match instead of failing.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        for name, value, low in (("num_inference_steps", num_inference_steps, 1), ("num_trajectories", num_trajectories, 1),
                                 ("batch_size", batch_size, 1), ("group_size", group_size, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        # Rejects a group longer than the schedule and an unknown group_starts, naming them.
        num_starts = len(_group_starts(num_inference_steps, group_size, group_starts))
        check_starts_per_batch(starts_per_batch, batch_size, num_starts)
        if num_trajectories < batch_size:
            raise ValueError(f"num_trajectories ({num_trajectories}) is smaller than batch_size ({batch_size}): "
                             "a batch would hold the same trajectory several times; lower batch_size or sample more")
        self.save_hyperparameters()
        self.conditioning_spec = ConditioningSpec.of(conditioning)
        # Plain data in the checkpoint, so that it loads with torch.load(weights_only=True).
        self.hparams["conditioning"] = self.conditioning_spec.to_dict() if self.conditioning_spec else None
        self.tensors: dict[str, Tensor] | None = None
        self.train_set: TrajectoryGroups | None = None

    # ----- what the LightningModule asks for (read, never written by it) -----
    def epoch_plan(self) -> EpochPlan:
        """The trainer's LightningModule's :class:`EpochPlan` (``epoch_plan()``), or the default plan."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        describe = getattr(module, "epoch_plan", None)
        return describe() if callable(describe) else EpochPlan()

    @property
    def model_path(self) -> str:
        """The FP teacher: ``teacher``, else the one the LightningModule's plan names."""
        path = self.hparams.teacher if self.hparams.teacher is not None else self.epoch_plan().teacher
        if path is None:
            raise ValueError("TrajectoryDataModule needs `teacher` (or a LightningModule whose epoch_plan() names one)")
        return path

    @property
    def group_size(self) -> int:
        return self.hparams.group_size

    def check_group_size(self, group_size: int) -> None:
        """Raise ``ValueError`` unless groups of ``group_size`` steps fit the schedule and the batch."""
        hp = self.hparams
        num_starts = len(_group_starts(hp.num_inference_steps, group_size, hp.group_starts))
        check_starts_per_batch(hp.starts_per_batch, hp.batch_size, num_starts)

    def make_scheduler(self) -> SchedulerMixin:
        """A fresh scheduler with the trajectories' timesteps set."""
        sched = scheduler_from_config(self.hparams.scheduler, load_scheduler_config(self.model_path))
        sched.set_timesteps(self.hparams.num_inference_steps)
        return sched

    def history_length(self) -> int:
        """How many FP steps before a group start prime the sampler there (0 for one-step samplers like DDIM)."""
        return history_steps(self.make_scheduler())

    def cache_key(self) -> dict[str, Any]:
        hp = self.hparams
        folder = inspect_model_folder(self.model_path)
        return {
            "model_sha256": sha256_tree(folder.unet_dir),
            "scheduler": hp.scheduler,
            "scheduler_config": folder.scheduler_config,
            "num_inference_steps": hp.num_inference_steps,
            "eta": hp.eta,
            "num_trajectories": hp.num_trajectories,
            "seed": hp.seed,
            **(self.conditioning_spec or ConditioningSpec()).cache_key(),
            "keep_model_outputs": hp.keep_model_outputs,
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
        unet = load_unet(self.model_path)
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        chunks: dict[str, list[Tensor]] = {"states": [], "model_outputs": [], "class_labels": [], "prompt_index": []}
        timesteps = None
        for start in range(0, hp.num_trajectories, hp.sampling_batch_size):
            index = torch.arange(start, min(start + hp.sampling_batch_size, hp.num_trajectories))
            extra = self.conditioning_spec.indices(index) if self.conditioning_spec is not None else {}
            cond = self.conditioning_spec.for_items(extra) if extra else None
            noise = initial_noise((hp.seed + index).tolist(), (cfg.in_channels, size, size))
            traj = sample(unet, self.make_scheduler(), noise, hp.num_inference_steps, cond=cond, eta=hp.eta,
                          generator=torch.Generator().manual_seed(hp.seed + start), keep_trajectory=True,
                          keep_model_outputs=hp.keep_model_outputs)
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
        self.train_set = TrajectoryGroups(self.tensors, hp.group_size, hp.group_starts, self.history_length())
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
        epoch_groups = {e: TrajectoryGroups(self.tensors, n, hp.group_starts, history)
                        for e, n in sorted(plan.group_sizes.items()) if n != hp.group_size}
        sampler = StartBatchSampler(self.train_set, hp.batch_size, plan.batches_per_epoch or self.steps_per_epoch,
                                    hp.start_weighting, seed=hp.seed, num_replicas=shard.get("num_replicas", 1),
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
