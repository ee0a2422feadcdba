"""Model loading and the digits teacher's architecture."""

from accuquant_pl.models.loading import (
    inspect_model_folder,
    load_scheduler_config,
    load_unet,
    scheduler_from_config,
)

__all__ = ["inspect_model_folder", "load_scheduler_config", "load_unet", "scheduler_from_config"]
