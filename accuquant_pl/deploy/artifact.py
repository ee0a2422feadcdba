"""A self-contained, deployable quantized model folder, and loading it back for diffusers pipelines.

Folder layout (everything a user needs; copy the folder, nothing else):

* ``quantized.safetensors``: packed integer weights (``<layer>.qweight``: int4 two per byte, or int8/uint8),
  per-channel ``weight_scale`` / ``weight_zero_point``, activation quantizer parameters, and the float tensors
  that stay float (biases, norms).
* ``quantization_map.json``: per layer bits, range, storage, shape and config; attention processors; the
  ``QuantSpec``; the SHA-256 of the safetensors file (a truncated or modified file is refused); the FP model it
  was calibrated from (``pretrained``) and the calibration's sampler (``sampler``), when the export knew them.
* ``unet_config.json``: the diffusers UNet config. ``scheduler_config.json``: the scheduler it was trained with.
* ``checksums.json``: the SHA-256 of every file above, written last. The folder is tamper-evident as a whole: a
  file that differs from its recorded checksum, or a map entry that is not what the map's own spec plans for
  the UNet, is refused with the file and entry named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from accuquant_pl.denoisers import SUPPORTED_DENOISERS, Denoiser
from accuquant_pl.deploy.freeze import frozen_state
from accuquant_pl.deploy.model import (
    build_deployed,
    check_map_against_model,
    load_deployed_state,
    set_execution,
)
from accuquant_pl.io import atomic_directory, atomic_path, atomic_write_text, readable_directory, sha256_file
from accuquant_pl.quant.convert import DEFAULT_TRAIN_TIMESTEPS, SPEC_ATTR
from accuquant_pl.quant.spec import QuantSpec

WEIGHTS_NAME = "quantized.safetensors"
MAP_NAME = "quantization_map.json"
UNET_CONFIG = "unet_config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
CHECKSUMS = "checksums.json"
ONNX_META = "onnx_export.json"  # an ONNX export folder's record (deploy.onnx_export)
FORMAT = "accuquant-pl/packed-quantized-model"
VERSION = 2  # 2: checksums.json covers every file (version 1 folders had only the weights' checksum)


def export_quantized(model: nn.Module, folder: str | Path, spec: QuantSpec | None = None,
                     scheduler_config: dict[str, Any] | None = None, pretrained: str | None = None,
                     sampler: dict[str, Any] | None = None) -> Path:
    """Freeze a calibrated model into packed integer weights and write ``folder`` (replaced atomically).

    ``pretrained``: the FP model folder or Hub id it was calibrated from (``ExportQuantized`` pins an id to its
    commit), recorded in the map so that ``quantized_pipeline`` finds the pipeline's other parts (autoencoder,
    text encoder) there. ``sampler``: the calibration's sampler (``scheduler``, ``num_inference_steps``, ``eta``),
    recorded so that ``quantized_pipeline`` samples with the sampler the model was calibrated for (and its
    ``guidance_scale``).

    Raises ``ValueError`` (and writes nothing) if an AdaRound quantizer is still soft, an activation quantizer
    is uncalibrated or quantization is switched off somewhere: the folder always holds a final model.
    """
    folder = Path(folder)
    spec = spec or getattr(model, SPEC_ATTR, None)
    if spec is None:
        raise ValueError("export needs the QuantSpec the model was quantized with (quantize() records it on the "
                         "model; or pass spec=): the loader checks every map entry against it")
    # A spec that still says "G equal groups" is resolved as quantize() resolved it; check_map_against_model below
    # refuses it if the model's quantizers disagree.
    spec = spec.resolved((scheduler_config or {}).get("num_train_timesteps", DEFAULT_TRAIN_TIMESTEPS))
    layers, processors, tensors = frozen_state(model)
    with torch.device("meta"):
        float_model = type(model).from_config(dict(model.config))
    check_map_against_model(float_model, layers, processors, spec)  # what the loader will check, before writing
    with atomic_directory(folder) as tmp:
        with atomic_path(tmp / WEIGHTS_NAME) as weights:
            save_file(tensors, weights, metadata={"format": FORMAT})
        qmap = {
            "format": FORMAT,
            "version": VERSION,
            "model_class": type(model).__name__,
            "spec": spec.to_dict() if spec is not None else None,
            "weights": {"file": WEIGHTS_NAME, "sha256": sha256_file(tmp / WEIGHTS_NAME), "tensors": len(tensors)},
            "layers": layers,
            "attention_processors": processors,
            **({"pretrained": str(pretrained)} if pretrained is not None else {}),
            **({"sampler": dict(sampler)} if sampler is not None else {}),
        }
        atomic_write_text(tmp / MAP_NAME, json.dumps(qmap, indent=2) + "\n")
        atomic_write_text(tmp / UNET_CONFIG, model.to_json_string())
        if scheduler_config is not None:
            atomic_write_text(tmp / SCHEDULER_CONFIG, json.dumps(dict(scheduler_config), indent=2, default=list))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        atomic_write_text(tmp / CHECKSUMS, json.dumps({"format": FORMAT, "sha256": files}, indent=2) + "\n")
    return folder


def verify_checksums(folder: Path, fmt: str = FORMAT, required: tuple[str, ...] = (MAP_NAME, WEIGHTS_NAME,
                                                                                 UNET_CONFIG)) -> None:
    """Raise ``ValueError`` naming the file unless every file recorded in ``checksums.json`` (of a folder of format
    ``fmt``) is there unchanged and the ``required`` files are among them."""
    record = _read_json(folder / CHECKSUMS)
    files = record.get("sha256")
    if record.get("format") != fmt or not isinstance(files, dict):
        raise ValueError(f"{folder / CHECKSUMS} is not a checksum list of this format; the folder is damaged")
    unrecorded = [name for name in required if name not in files]
    unrecorded += sorted(p.name for p in folder.iterdir() if p.name not in files and p.name != CHECKSUMS)
    if unrecorded:
        raise ValueError(f"{folder / CHECKSUMS} records no checksum of {unrecorded}: the folder was changed after "
                         "export; re-export the model")
    for name, digest in files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise FileNotFoundError(f"quantized model folder {str(folder)!r} has no {name}")
        if sha256_file(path) != digest:
            raise ValueError(f"{path} does not match the SHA-256 recorded in {CHECKSUMS}: the file was "
                             "truncated or modified after export; export it again")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"quantized model folder {str(path.parent)!r} has no {path.name}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the folder is damaged") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _unet_class(folder: Path) -> tuple[type[nn.Module], dict[str, Any]]:
    config_file = folder / UNET_CONFIG
    config = _read_json(config_file)
    cls_name = config.get("_class_name")
    if cls_name not in SUPPORTED_DENOISERS:
        raise ValueError(f"{config_file}: {cls_name!r} is not a supported denoiser ({sorted(SUPPORTED_DENOISERS)})")
    return SUPPORTED_DENOISERS[cls_name], config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    # Its bytes were checked against checksums.json (verify_checksums) before.
    path = folder / WEIGHTS_NAME
    try:
        return load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def _load_packed(folder: Path, qmap: dict[str, Any], execution: str) -> nn.Module:
    unet_cls, config = _unet_class(folder)
    if qmap.get("model_class") != unet_cls.__name__:
        raise ValueError(f"{MAP_NAME} was written for {qmap.get('model_class')!r} but {UNET_CONFIG} "
                         f"describes {unet_cls.__name__!r}")
    for key in ("layers", "attention_processors"):
        if not isinstance(qmap.get(key), dict):
            raise ValueError(f"{folder / MAP_NAME} has no {key!r} section; the map is damaged")
    if not isinstance(qmap.get("spec"), dict):
        raise ValueError(f"{folder / MAP_NAME} records no QuantSpec; the map is damaged")
    try:
        spec = QuantSpec.from_export(qmap["spec"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / MAP_NAME}: its spec is invalid: {err}") from err
    try:
        model = build_deployed(unet_cls, config, qmap["layers"], qmap["attention_processors"], spec)
    except ValueError as err:
        raise ValueError(f"{folder / MAP_NAME}: {err}") from err
    try:
        load_deployed_state(model, _read_tensors(folder))
    except ValueError as err:
        raise ValueError(f"{folder / WEIGHTS_NAME}: {err}") from err
    setattr(model, SPEC_ATTR, spec)
    model.eval().requires_grad_(False)
    set_execution(model, execution)
    return model


def load_quantized(folder: str | Path, execution: str = "dequant") -> Denoiser:
    """The quantized UNet of an exported folder, in eval mode without gradients; a drop-in ``unet`` for
    diffusers pipelines (``DDIMPipeline(unet=..., scheduler=...)``, or a conditional pipeline's ``unet``).

    Args:
        folder: a folder written by :func:`export_quantized`.
        execution: ``dequant`` (packed weights, dequantized per forward; bit-identical to the calibrated
            model), ``cached`` (dequantized once: float speed and memory, bit-identical) or ``int``
            (int8 GEMMs via ``torch._int_mm``, equal up to float rounding).

    A missing file, a map that does not fit the UNet config, a missing, extra or reshaped tensor, a modified
    or truncated weights file: each raises ``FileNotFoundError`` / ``ValueError`` naming the problem.
    """
    # An export being replaced (or whose replacement was killed) between its two renames is read where it is.
    folder = readable_directory(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"quantized model folder {str(folder)!r} does not exist")
    _unet_class(folder)  # the config is checked first: it says what the folder is meant to hold
    qmap = _read_json(folder / MAP_NAME)
    fmt, version = qmap.get("format"), qmap.get("version")
    if (fmt, version) == (FORMAT, VERSION):
        verify_checksums(folder)
        return _load_packed(folder, qmap, execution)
    if (fmt, version) == (FORMAT, 1):
        raise ValueError(f"{folder} was exported by an earlier accuquant-pl ({FORMAT} v1, without {CHECKSUMS}); "
                         "re-export it")
    raise ValueError(f"{folder / MAP_NAME}: format {fmt!r} v{version} is not {FORMAT} v{VERSION}; export the "
                     "model again with this version of accuquant-pl")


def exported_scheduler_config(folder: str | Path) -> dict[str, Any] | None:
    """The scheduler config saved in a quantized model folder, or None if it has none."""
    path = readable_directory(folder) / SCHEDULER_CONFIG
    return _read_json(path) if path.is_file() else None


def _record(folder: str | Path) -> dict[str, Any]:
    """The folder's record of its calibration: the quantization map, or an ONNX export's metadata (which copies
    the map's ``pretrained`` and ``sampler``)."""
    folder = readable_directory(folder)
    return _read_json(folder / ONNX_META if (folder / ONNX_META).is_file() else folder / MAP_NAME)


def recorded_pretrained(record: dict[str, Any]) -> str | None:
    """The FP model a quantization map or ONNX metadata records: ``pretrained``, or ``source_model`` in a folder
    exported before the key was renamed (same format version: the value means the same)."""
    return record.get("pretrained", record.get("source_model"))


def exported_pretrained(folder: str | Path) -> str | None:
    """The FP model (folder or Hub id) a quantized (or ONNX) folder was calibrated from, when its export recorded it."""
    return recorded_pretrained(_record(folder))


def exported_sampler(folder: str | Path) -> dict[str, Any] | None:
    """The sampler a quantized (or ONNX) folder was calibrated with (``scheduler``, ``num_inference_steps``,
    ``eta``, ``guidance_scale``), when its export recorded it."""
    return _record(folder).get("sampler")
