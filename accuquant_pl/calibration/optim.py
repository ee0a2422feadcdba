"""The optimiser of one calibration epoch: Adam over the trained module's quantization parameters, one group per
kind at its own learning rate, on a cosine schedule over the epoch's iterations."""

from __future__ import annotations

import torch
from torch import nn

from accuquant_pl.calibration.config import CalibrationSettings
from accuquant_pl.quant import layer_biases, unit_parameters


def epoch_parameters(trained: nn.Module, student: nn.Module, final_stage: bool) -> dict[str, list[nn.Parameter]]:
    """What an epoch trains, by kind: the unit's (or, in the final stage, the whole student's) rounding variables
    and step sizes, plus in the final stage the quantized layers' float biases."""
    # In the final stage every unit is hardened, so the student's groups hold no rounding variables.
    groups = unit_parameters(trained)
    if final_stage:
        groups["bias"] = layer_biases(student)
    return groups


def epoch_optimizer(groups: dict[str, list[nn.Parameter]], settings: CalibrationSettings, iterations: int
                    ) -> tuple[torch.optim.Adam | None, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam and its cosine schedule over ``groups`` (which it sets to require grad); (None, None) when there is
    nothing to train (e.g. a class-embedding table, which is not quantized)."""
    lrs = {"adaround": settings.lrs["lr_adaround"], "act_scale": settings.lrs["lr_act_scale"],
           "weight_scale": settings.lrs["lr_weight_scale"],
           "bias": settings.final_stage.lr_bias if settings.final_stage else None}
    param_groups = [{"params": ps, "lr": lrs[kind]} for kind, ps in groups.items() if ps]
    if not param_groups:
        return None, None
    for group in param_groups:
        for p in group["params"]:
            p.requires_grad_(True)
    optimizer = torch.optim.Adam(param_groups)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations)
