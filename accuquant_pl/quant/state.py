"""Per-module quantization switches and parameter collection, always scoped to a module subtree."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adaround import AdaRoundQuantizer
from .quantizers import ActivationQuantizer, WeightQuantizer


class QuantStateMixin:
    """Owns the switches ``weight_quant_enabled`` / ``act_quant_enabled`` of one quantized module.

    Change them through :func:`set_quant_state` or :func:`quant_state`, not directly, so a whole
    subtree is always switched consistently. Modules without weights ignore ``weight_quant_enabled``.
    """

    weight_quant_enabled: bool = True
    act_quant_enabled: bool = True

    def _init_quant_state(self) -> None:
        self.weight_quant_enabled = True
        self.act_quant_enabled = True


def _stateful(module: nn.Module) -> Iterator[nn.Module]:
    return (m for m in module.modules() if isinstance(m, QuantStateMixin))


def set_quant_state(module: nn.Module, weight: bool | None = None, act: bool | None = None) -> None:
    """Switch weight and/or activation fake-quantization of every quantized module under ``module``.

    ``None`` leaves that switch as it is.
    """
    for m in _stateful(module):
        if weight is not None:
            m.weight_quant_enabled = weight
        if act is not None:
            m.act_quant_enabled = act


@contextmanager
def quant_state(module: nn.Module, weight: bool | None = None, act: bool | None = None) -> Iterator[nn.Module]:
    """Context manager form of :func:`set_quant_state`; restores every module's previous switches on exit."""
    saved = [(m, m.weight_quant_enabled, m.act_quant_enabled) for m in _stateful(module)]
    set_quant_state(module, weight=weight, act=act)
    try:
        yield module
    finally:
        for m, w, a in saved:
            m.weight_quant_enabled, m.act_quant_enabled = w, a


@contextmanager
def observing(module: nn.Module) -> Iterator[list[ActivationQuantizer]]:
    """Within the block, every activation quantizer under ``module`` records statistics and passes its
    input through unquantized. Yields the quantizers."""
    quantizers = [m for m in module.modules() if isinstance(m, ActivationQuantizer)]
    saved = [q.observing for q in quantizers]
    for q in quantizers:
        q.observing = True
    try:
        yield quantizers
    finally:
        for q, s in zip(quantizers, saved, strict=True):
            q.observing = s


def unit_parameters(unit: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Quantization parameters under ``unit``, grouped for an optimiser.

    ``adaround``: V of un-hardened AdaRound quantizers; ``act_scale``: LSQ step sizes of active
    (non-16-bit) activation quantizers; ``weight_scale``: step sizes of round-to-nearest weight
    quantizers (AdaRound grids are fixed buffers). Float weights are never included.
    """
    groups: dict[str, list[nn.Parameter]] = {"adaround": [], "act_scale": [], "weight_scale": []}
    for m in unit.modules():
        if isinstance(m, AdaRoundQuantizer) and m.alpha is not None and not m.is_off:
            groups["adaround"].append(m.alpha)
        elif isinstance(m, ActivationQuantizer) and not m.is_off:
            groups["act_scale"].append(m.scale)
        elif isinstance(m, WeightQuantizer) and not m.is_off:
            groups["weight_scale"].append(m.scale)
    return groups


def adaround_regularizer(unit: nn.Module, beta: float) -> torch.Tensor:
    """Sum of the AdaRound rounding regularisers of the un-hardened quantizers under ``unit``.

    A 0-d zero (CPU; it broadcasts onto any device) when there is none.
    """
    terms = [m.regularizer(beta) for m in unit.modules() if isinstance(m, AdaRoundQuantizer) and not m.hardened]
    return torch.stack([t.reshape(()) for t in terms]).sum() if terms else torch.zeros(())
