"""FP sampler trajectories as calibration items: where n-step groups start, and the dataset of (trajectory,
start) items with their FP history (per-step items are groups of n = 1)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

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


def check_starts_per_batch(starts_per_batch: int, batch_size: int, num_starts: int) -> None:
    """A batch splits into ``starts_per_batch`` equal sub-batches at distinct starts, of ``num_starts``."""
    if starts_per_batch < 1 or batch_size % starts_per_batch:
        raise ValueError(f"starts_per_batch must be >= 1 and divide batch_size {batch_size}, got {starts_per_batch}")
    if starts_per_batch > num_starts:
        raise ValueError(f"starts_per_batch {starts_per_batch} exceeds the {num_starts} group starts of the schedule")


class TrajectoryGroups(Dataset):
    """Item (trajectory i, start j): x = states[i, j], the n timesteps from j, target = states[i, j + n]."""

    def __init__(self, tensors: dict[str, Tensor], group_size: int = 1, starts: GroupStarts = "all",
                 history: int = 0, eta: float = 0.0) -> None:
        self.states, self.timesteps = tensors["states"], tensors["timesteps"]
        # A stochastic sampler's trajectories: each item names its trajectory's seed (and the sampler's eta) so
        # that the rollout draws the noise the FP sampler drew (diffusion/noise.py).
        self.noise_seeds, self.eta = tensors.get("noise_seeds"), eta
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
        if self.noise_seeds is not None:
            out["noise_seed"] = int(self.noise_seeds[i])
            out["eta"] = self.eta
        if self.history:
            # FP inputs and outputs of the (up to `history`) steps before j: a multistep sampler is primed from
            # them at the group start (`prime` in diffusion/schedulers.py). Items of a batch share j, so they
            # collate.
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
