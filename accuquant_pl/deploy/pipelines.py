"""The diffusers pipeline that fits an exported quantized model: its quantized denoiser swapped into the FP
model's pipeline, with the scheduler saved in the export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    LDMPipeline,
    ModelMixin,
    SchedulerMixin,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

from accuquant_pl.denoisers import denoiser_class
from accuquant_pl.deploy.artifact import (
    SCHEDULER_CONFIG,
    exported_pretrained,
    exported_sampler,
    exported_scheduler_config,
)
from accuquant_pl.deploy.onnx_runtime import load_exported
from accuquant_pl.diffusion.hub import model_exists, resolve_model_path
from accuquant_pl.diffusion.loading import load_vae
from accuquant_pl.diffusion.schedulers import SCHEDULERS, scales_model_input, scheduler_from_config

CALIBRATED = "calibrated"


def _scheduler(folder: str | Path, name: str | None) -> SchedulerMixin:
    """The export's scheduler: its own class, the calibration's sampler, or the named one, built from its config."""
    config = exported_scheduler_config(folder)
    if config is None:
        raise FileNotFoundError(f"quantized model folder {str(folder)!r} has no {SCHEDULER_CONFIG}")
    if name == CALIBRATED:
        # Exports before the sampler was recorded: DDIM, the sampler every shipped config calibrates for.
        name = (exported_sampler(folder) or {}).get("scheduler", "ddim")
    if name is not None:
        return scheduler_from_config(name, config)
    by_class = {cls.__name__: key for key, cls in SCHEDULERS.items()}
    return scheduler_from_config(by_class.get(config.get("_class_name"), "ddim"), config)


def _source(folder: str | Path, pretrained: str | Path | None) -> Path | None:
    """The FP model folder whose other parts (autoencoder, text encoder) the pipeline takes: ``pretrained``, else
    the one the export recorded; None when neither is given (a pixel-space model needs none)."""
    source = str(pretrained) if pretrained is not None else exported_pretrained(folder)
    if source is None:
        return None
    if not model_exists(source):
        raise FileNotFoundError(f"the FP model {source!r} that {str(folder)!r} was calibrated from does not exist "
                                "here; pass quantized_pipeline(folder, pretrained=<its folder or Hub id>)")
    return resolve_model_path(source)


# A pixel UNet's pipeline follows the scheduler (DDIMPipeline replaces any scheduler by DDIM, so a folder saved
# as one would drop a calibrated DDPM), not the class its folder was saved as.
PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")


def _index_class(root: Path) -> str | None:
    """The pipeline class a folder's ``model_index.json`` names; None without one."""
    index = root / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def _denoiser_key(denoiser: nn.Module) -> str:
    return "unet" if denoiser_class(denoiser) in (UNet2DModel.__name__, UNet2DConditionModel.__name__) else "transformer"


def _from_model_index(root: Path, denoiser: nn.Module, scheduler: SchedulerMixin) -> Any:
    """The FP pipeline folder's own pipeline class (``model_index.json``), its denoiser and scheduler replaced."""
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in (
        (root / "model_index.json").read_text()) else {}
    key = _denoiser_key(denoiser)
    # from_pretrained takes only diffusers models as components: for an ONNX Runtime denoiser it loads the other
    # parts (the FP denoiser skipped: None, no FP weights read), then the pipeline is built again with the denoiser,
    # since pipelines derive settings from it in __init__ (Stable Diffusion's sample-size check).
    runtime = not isinstance(denoiser, ModelMixin)
    try:
        pipe = DiffusionPipeline.from_pretrained(root, **{key: None if runtime else denoiser}, scheduler=scheduler,
                                                 **extra)
    except ImportError as err:
        raise ImportError(f"the pipeline of {str(root)!r} needs a package that is not installed ({err}); "
                          "pip install 'accuquant-pl[pipelines]'") from err
    if runtime:
        settings = {k: v for k, v in extra.items() if k not in pipe.components}
        pipe = type(pipe)(**{**pipe.components, key: denoiser, **settings})
    return pipe


def _assembled(root: Path | None, denoiser: nn.Module, scheduler: SchedulerMixin) -> Any:
    """A pipeline assembled from the parts of a folder (component folders, or a pixel UNet's pipeline folder)."""
    if denoiser_class(denoiser) == UNet2DConditionModel.__name__:
        if root is None or not (root / "text_encoder").is_dir() or not (root / "tokenizer").is_dir():
            raise TypeError("a UNet2DConditionModel samples through a text-to-image pipeline: pass pretrained= the FP "
                            "folder with vae/, text_encoder/ and tokenizer/ (or use `predict` with prompt "
                            "embeddings)")
        return _stable_diffusion(root, denoiser, scheduler)
    if denoiser_class(denoiser) == DiTTransformer2DModel.__name__:
        vae = load_vae(root) if root is not None else None
        if vae is None:
            raise TypeError("DiTPipeline needs the latent model's autoencoder: pass pretrained= the FP folder with "
                            "vae/ (a pixel-space DiT has no diffusers pipeline: sample it with `predict`)")
        return DiTPipeline(transformer=denoiser, vae=vae, scheduler=scheduler)
    if denoiser_class(denoiser) != UNet2DModel.__name__:
        raise TypeError(f"no diffusers pipeline for a quantized {denoiser_class(denoiser)} without the FP pipeline "
                        "folder's model_index.json; pass pretrained=")
    if denoiser.config.num_class_embeds is not None or denoiser.config.class_embed_type is not None:
        raise TypeError("a class-conditional UNet2DModel has no diffusers pipeline; sample it with `predict` "
                        "(--model.init_args.conditioning.num_classes)")
    vae = load_vae(root) if root is not None else None
    if vae is not None:
        return LDMPipeline(vqvae=vae, unet=denoiser, scheduler=scheduler)
    if isinstance(scheduler, DDIMScheduler):
        return DDIMPipeline(unet=denoiser, scheduler=scheduler)
    if scales_model_input(scheduler):  # DDPMPipeline's loop would sample wrong images without an error
        raise TypeError(f"{type(scheduler).__name__} scales the model input, which DDPMPipeline (the pixel UNet's "
                        "pipeline for samplers other than DDIM) does not do; pass quantized_pipeline(folder, "
                        "scheduler='ddim') or sample with `predict`, which scales for every sampler")
    return DDPMPipeline(unet=denoiser, scheduler=scheduler)


def _stable_diffusion(root: Path, unet: nn.Module, scheduler: SchedulerMixin) -> Any:
    try:
        from diffusers import StableDiffusionPipeline
        from transformers import AutoTokenizer, CLIPTextModel
    except ImportError as err:
        raise ImportError(f"StableDiffusionPipeline needs transformers ({err}); pip install "
                          "'accuquant-pl[pipelines]'") from err
    return StableDiffusionPipeline(
        vae=load_vae(root), text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def quantized_pipeline(folder: str | Path, pretrained: str | Path | None = None, scheduler: str | None = CALIBRATED,
                       execution: str = "dequant", onnx_threads: int | None = None,
                       onnx_providers: list[str] | None = None) -> Any:
    """The diffusers pipeline of the quantized model in ``folder``, with the quantized denoiser and the export's
    scheduler swapped in.

    The other parts come from the FP model it was calibrated from (``pretrained``, else the folder or Hub id the
    export recorded): a pipeline folder with ``model_index.json`` gives its own pipeline class
    (``DiffusionPipeline.from_pretrained``: LDMPipeline, StableDiffusionPipeline, DiTPipeline, PixArt, ...);
    component folders (and a pixel UNet's DDPM/DDIM pipeline folder) give ``DDIMPipeline`` for DDIM /
    ``DDPMPipeline`` for other samplers for a pixel UNet, ``LDMPipeline`` for a UNet with
    ``vae/`` or ``vqvae/``, ``StableDiffusionPipeline`` for a text UNet with ``text_encoder/`` and ``tokenizer/``,
    ``DiTPipeline`` for a DiT with ``vae/``.

    Args:
        folder: an ``ExportQuantized`` folder, or its ONNX export (``export_onnx``): the pipeline's denoiser is then
            an :class:`~accuquant_pl.deploy.onnx_runtime.OnnxDenoiser` (ONNX Runtime).
        pretrained: the FP model folder or Hub id (default: the one recorded at export).
        scheduler: ``calibrated`` (default): the sampler the calibration's trajectories followed, as the export
            recorded it (``exported_sampler(folder)`` also gives its ``num_inference_steps``, ``eta`` and
            ``guidance_scale``, to pass to the pipelines that take them; ``ddim`` for an export that did not
            record it); a name in ``scheduler_names()`` or a scheduler class's import path; None keeps the class
            of the export's scheduler config. Built from that config. A pixel UNet's pipeline for a sampler other
            than DDIM is ``DDPMPipeline``, whose loop cannot drive a sampler that scales its input (Euler): refused.
        execution: ``dequant``, ``cached`` or ``int`` (see ``load_quantized``; a PyTorch folder).
        onnx_threads, onnx_providers: ONNX Runtime's intra-op threads and execution providers (an ONNX folder).
    """
    denoiser = load_exported(folder, execution, onnx_threads, onnx_providers)
    sched = _scheduler(folder, scheduler)
    root = _source(folder, pretrained)
    if root is not None and _index_class(root) not in (None, *PIXEL_PIPELINES):
        pipe = _from_model_index(root, denoiser, sched)
    else:
        pipe = _assembled(root, denoiser, sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe
