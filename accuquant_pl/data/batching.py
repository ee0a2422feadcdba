"""How calibration batches are drawn from trajectory groups: one (or a few) group starts per batch, weighted over
the schedule, sharded over data-parallel ranks, resumable mid-epoch, with epochs whose group size differs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler

from accuquant_pl.data.groups import StartWeighting, TrajectoryGroups, check_starts_per_batch


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
