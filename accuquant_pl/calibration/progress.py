"""What a calibration checkpoint holds besides the state dict: the units done (hardened), whether the final stage
finished, the RNG state, the trainer precision, the FP model's pinned source and, for a checkpoint written inside an
epoch, where in it."""

from __future__ import annotations

from typing import Any

from torch import nn

from accuquant_pl.calibration.rng import rng_state
from accuquant_pl.diffusion.hub import hub_reference
from accuquant_pl.quant import AdaRoundQuantizer


def progress_section(done_units: list[str], final_stage_done: bool, precision: str,
                     mid_epoch: dict[str, Any] | None, source_model: str | None = None) -> dict[str, Any]:
    return {"done_units": list(done_units), "final_stage_done": final_stage_done, "rng": rng_state(),
            "precision": precision,  # compared on resume (a result-changing trainer setting)
            "mid_epoch": mid_epoch, "source_model": source_model}


def saved_progress(checkpoint: dict[str, Any], section: str, pretrained: str,
                   source_model: str | None) -> dict[str, Any]:
    """The checkpoint's ``section`` (written by :func:`progress_section`), refused when it has none or when its FP
    model is not the one loaded now (:func:`check_same_source`)."""
    state = checkpoint.get(section)
    if state is None:
        raise ValueError(f"checkpoint has no {section!r} section: it was not written by BlockReconstruction")
    check_same_source(state.get("source_model"), pretrained, source_model)
    return state


def restore_hardened_units(student: nn.Module, done_units: list[str], unit_names: list[str]) -> None:
    """Give the done units' AdaRound quantizers the hardened structure their saved state has (V dropped), so that
    the checkpoint's state dict loads into ``student``."""
    unknown = [n for n in done_units if n not in unit_names]
    if unknown:
        raise ValueError(f"checkpoint names units {unknown} that this model does not have")
    for name in done_units:
        for q in student.get_submodule(name).modules():
            if isinstance(q, AdaRoundQuantizer) and not q.hardened and not q.is_off:
                q.mark_hardened(tuple(q.alpha.shape))


def mid_epoch_state(section: dict[str, Any], checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The position inside an epoch a checkpoint was written at, with the epoch optimiser's state, or None."""
    mid = section.get("mid_epoch")
    if mid is None or mid["lr_schedule"] is None:
        return mid
    optimizer_states = checkpoint.get("optimizer_states") or []
    if len(optimizer_states) != 1:
        raise ValueError("the checkpoint was written inside an epoch but holds no optimiser state (saved "
                         "weights-only?); resume from a checkpoint saved at the end of a unit")
    return {**mid, "optimizer": optimizer_states[0]}


def resume_epoch_position(state: dict[str, Any], epoch: int, epoch_names: list[str], optimizer: Any,
                          lr_schedule: Any) -> int:
    """Load a mid-epoch checkpoint's optimiser and lr-schedule state into the epoch's fresh ones; return the
    iteration to continue from."""
    if state["epoch"] != epoch:
        raise RuntimeError(f"the checkpoint was written inside epoch {state['epoch']} "
                           f"({epoch_names[state['epoch']]}), but training resumed at epoch {epoch}")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
    return int(state["iteration"])


def check_same_source(recorded: str | None, pretrained: str, source_model: str | None) -> None:
    """Refuse a resume whose Hub id now resolves to another commit than the checkpoint recorded (``recorded``; None
    in older checkpoints): the units done were calibrated on the recorded commit's weights, the rest would not be."""
    if recorded is None or hub_reference(pretrained) is None or recorded == source_model:
        return
    raise ValueError(f"the checkpoint was calibrated from {recorded!r}, but {pretrained!r} now resolves to "
                     f"{source_model!r} (the Hub branch moved), and a run does not continue on other weights; start "
                     f"it again without --ckpt_path, the id pinned: --model.init_args.pretrained {recorded} (the old "
                     f"weights) or {source_model} (the new)")
