"""The quantized UNet held by a calibration checkpoint (a ``BlockReconstruction`` Lightning ``.ckpt``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from accuquant_pl.calibration.module import BlockReconstruction
from accuquant_pl.calibration.rng import rng_state, set_rng_state
from accuquant_pl.diffusion.hub import model_exists
from accuquant_pl.quant import QuantSpec


def is_calibration_checkpoint(checkpoint: dict[str, Any]) -> bool:
    section = BlockReconstruction.CHECKPOINT_SECTION
    return section in checkpoint and "state_dict" in checkpoint and "hyper_parameters" in checkpoint


def student_from_checkpoint(checkpoint: dict[str, Any], pretrained: str | None = None) -> nn.Module:
    """Rebuild the calibrated student of ``checkpoint`` and finalize it (uncalibrated units: nearest rounding).

    Args:
        checkpoint: the loaded checkpoint dictionary.
        pretrained: FP model folder to build the structure from, when it moved since calibration.
    """
    if not is_calibration_checkpoint(checkpoint):
        raise ValueError(f"not a calibration checkpoint: it lacks the {BlockReconstruction.CHECKPOINT_SECTION!r}, "
                         "'state_dict' or 'hyper_parameters' section that BlockReconstruction writes")
    hparams = dict(checkpoint["hyper_parameters"])
    if isinstance(hparams.get("quant"), dict):  # a spec written before timestep groups existed: one range
        hparams["quant"] = QuantSpec.from_export(hparams["quant"]).to_dict()
    if pretrained is not None:
        hparams["pretrained"] = pretrained
    if not model_exists(hparams["pretrained"]):
        raise FileNotFoundError(f"the checkpoint's FP model folder {hparams['pretrained']!r} does not exist; "
                                "pass the folder it was calibrated from")
    try:
        module = BlockReconstruction(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    except TypeError as err:  # settings of a BlockReconstruction signature that no longer exists
        raise ValueError(f"the checkpoint's model settings do not fit this accuquant-pl ({err}); it was written by "
                         "an earlier version: evaluate its exported folder, or calibrate again") from err
    rng = rng_state()  # restoring a checkpoint also restores the calibration RNG; evaluation must not see that
    try:
        module.on_load_checkpoint(checkpoint)
    finally:
        set_rng_state(rng)
    module.load_state_dict(checkpoint["state_dict"])
    return module.finalize()
