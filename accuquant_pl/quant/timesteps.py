"""Timestep-aware activation ranges: the timestep of the forward in progress, for the quantizers that need it.

The layers of a UNet never see the timestep, yet an activation quantizer with timestep groups must pick the
step size of the sampler step it runs in. :func:`attach_timestep_router` registers a forward pre-hook on the
model that records the ``timestep`` argument of each forward in one :class:`TimestepRouter`, shared by the
model's grouped quantizers; a forward hook (run even when the forward raises) clears it, so a quantizer run
outside a model forward fails loudly instead of using a stale timestep.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .quantizers import ActivationQuantizer

ROUTER_ATTR = "accuquant_timestep_router"
"""Attribute of a model that holds its :class:`TimestepRouter` (absent when no quantizer has timestep groups)."""


class TimestepRouter:
    """The timestep of the model forward in progress: ``[1]`` for the whole batch, or one per sample.

    ``forward`` is the signature of the hooked model's forward, read once when the router is made (the hook
    runs on every model call), so that UNets (sample, timestep, ...) and transformers (hidden_states,
    [encoder_hidden_states,] timestep, ...) are read alike, positional or keyword."""

    def __init__(self, forward: inspect.Signature) -> None:
        self.forward = forward
        self.timestep: torch.Tensor | None = None

    def current(self, who: str = "a quantizer") -> torch.Tensor:
        """The recorded timestep; ``RuntimeError`` outside a model forward."""
        if self.timestep is None:
            raise RuntimeError(f"{who} needs the timestep of the model forward it runs in, and no model forward "
                               "is in progress (call the whole model, not one of its layers)")
        return self.timestep

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: record the forward's ``timestep`` argument."""
        bound = self.forward.bind_partial(*args, **kwargs).arguments
        sample = bound.get("sample", bound.get("hidden_states"))
        timestep = bound.get("timestep")
        if timestep is None or sample is None:
            raise ValueError(f"{type(module).__name__} has timestep-grouped activation ranges: its forward needs "
                             "`sample` and `timestep`")
        t = torch.as_tensor(timestep, device=sample.device).detach().reshape(-1)
        if t.numel() not in (1, sample.shape[0]):
            raise ValueError(f"{t.numel()} timesteps for a batch of {sample.shape[0]} samples; give one timestep, "
                             "or one per sample")
        self.timestep = t

    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """Forward hook: the forward is over, forget its timestep."""
        self.timestep = None


def grouped_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    """Activation quantizers under ``model`` that have more than one timestep group."""
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer) and m.num_groups > 1]


def attach_timestep_router(model: nn.Module) -> TimestepRouter | None:
    """Give every timestep-grouped quantizer of ``model`` the model's router (created and hooked once);
    ``None`` when no quantizer has groups."""
    quantizers = grouped_quantizers(model)
    if not quantizers:
        return None
    router = getattr(model, ROUTER_ATTR, None)
    if router is None:
        router = TimestepRouter(inspect.signature(model.forward))
        model.register_forward_pre_hook(router.before_forward, with_kwargs=True)
        model.register_forward_hook(router.after_forward, with_kwargs=True, always_call=True)
        setattr(model, ROUTER_ATTR, router)
    for q in quantizers:
        q.timestep_source = router
    return router


def check_groups_hold_timesteps(boundaries: list[float], timesteps: torch.Tensor, field: str = "act_timestep_boundaries",
                                num_train_timesteps: int | None = None) -> None:
    """Raise ``ValueError`` naming ``field`` unless every timestep group holds at least one of the sampler's
    ``timesteps`` (an empty group could never be initialised nor used)."""
    if not boundaries:
        return
    edges = torch.tensor([float(b) for b in boundaries], dtype=torch.float64)
    groups = set(torch.bucketize(timesteps.double().reshape(-1), edges, right=True).tolist())
    empty = [g for g in range(len(boundaries) + 1) if g not in groups]
    if empty:
        schedule = f" of {num_train_timesteps} training timesteps" if num_train_timesteps is not None else ""
        raise ValueError(
            f"{field}={list(boundaries)} leaves timestep group(s) {empty} without any of the sampler's "
            f"timesteps{schedule} ({timesteps.min().item():g} .. {timesteps.max().item():g}); choose boundaries "
            "inside the schedule, fewer act_timestep_groups, or [] / 1 group for one range")
