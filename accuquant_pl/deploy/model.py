"""A whole deployed denoiser: structure rebuilt from a quantization map, strictly checked tensors, execution switch.

The structure is built on the meta device (no float weights are allocated or randomly initialised) and the
loaded tensors are assigned into it, so a deployed model holds the packed integer weights and nothing else.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from accuquant_pl.quant.attention import install_quant_processor
from accuquant_pl.quant.convert import plan_layers, set_submodule
from accuquant_pl.quant.layers import QUANT_CLASSES, QUANT_LAYERS
from accuquant_pl.quant.quantizers import ActivationQuantizer
from accuquant_pl.quant.spec import ActQuantConfig, LayerQuantConfig, QuantSpec
from accuquant_pl.quant.timesteps import attach_timestep_router

from .layers import DEPLOYED_LAYERS, DeployedLayer, WeightFormat

_FLOAT_OF = {q.__name__: f for f, q in QUANT_LAYERS.items()}


def _layer_parts(name: str, entry: dict[str, Any]) -> tuple[type[nn.Module], WeightFormat, LayerQuantConfig]:
    """Float type, weight format and config of one map entry; ``ValueError`` naming the layer if malformed."""
    try:
        if entry["class"] not in QUANT_CLASSES:
            raise ValueError(f"unknown class {entry['class']!r}")
        fmt = WeightFormat.from_dict(entry["weight"])
        config = LayerQuantConfig.from_dict(entry["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"quantization map entry of layer {name!r} is malformed: {err!r}") from err
    if (config.weight.bits, config.weight.symmetric) != (fmt.bits, fmt.symmetric):
        raise ValueError(f"quantization map entry of layer {name!r}: weight format ({fmt.bits} bits) disagrees "
                         f"with its config ({config.weight.bits} bits)")
    return _FLOAT_OF[entry["class"]], fmt, config


def _normalised(config: Any, cls: type) -> Any:
    """``config`` with the defaults of keys added after it was written (a readable entry only)."""
    try:
        return asdict(cls.from_dict(config) if hasattr(cls, "from_dict") else cls(**config))
    except (KeyError, TypeError, ValueError):
        return config  # malformed: compared as it is, so the difference names it


def _config_differences(prefix: str, recorded: Any, planned: Any) -> list[str]:
    if isinstance(recorded, dict) and isinstance(planned, dict):
        return [d for key in sorted(set(recorded) | set(planned))
                for d in _config_differences(f"{prefix}.{key}", recorded.get(key), planned.get(key))]
    return [] if recorded == planned else [f"{prefix}: {recorded!r} (the spec gives {planned!r})"]


def check_map_against_model(model: nn.Module, layers: dict[str, Any], processors: dict[str, Any],
                            spec: QuantSpec | None) -> None:
    """Raise ``ValueError`` unless the map quantizes exactly the layers (and attention processors) that ``spec``
    plans for ``model``, each with the planned configuration; without a spec, exactly its Conv2d / Linear layers.

    This is what keeps an edited map entry (activation bits, symmetry, a processor's bits) from loading: the
    tensors alone cannot tell a 4-bit from an 8-bit activation range."""
    if spec is None:
        expected = {n for n, m in model.named_modules() if type(m) in QUANT_LAYERS}
        planned_layers, planned_processors = None, None
    else:
        planned_layers, planned_processors = plan_layers(model, spec)
        expected = set(planned_layers)
    missing, extra = sorted(expected - set(layers)), sorted(set(layers) - expected)
    if missing or extra:
        raise ValueError(f"the quantization map's layers are not the model's: missing {missing[:10]}, "
                         f"not in the model {extra[:10]}")
    if planned_layers is None:
        return
    wrong = [d for name, cfg in planned_layers.items()
             for d in _config_differences(f"layer {name!r}", _normalised(layers[name].get("config"), LayerQuantConfig),
                                          asdict(cfg))]
    if set(processors) != set(planned_processors):
        wrong.append(f"attention processors {sorted(set(processors) ^ set(planned_processors))[:10]} "
                     "differ from the ones the spec quantizes")
    wrong += [d for name, cfg in planned_processors.items() if name in processors
              for d in _config_differences(f"processor {name!r}", _normalised(processors[name].get("config"), ActQuantConfig),
                                           asdict(cfg))]
    if wrong:
        raise ValueError(f"the quantization map disagrees with its own spec: {'; '.join(wrong[:5])}"
                         f"{' ...' if len(wrong) > 5 else ''}")


def _compute_buffers(model: nn.Module, cls: type[nn.Module], config: dict[str, Any]) -> None:
    """Fill the non-persistent buffers of a meta-device model, which ``__init__`` computes and no file holds (DiT's
    and PixArt's sin-cos position table), from a CPU instance of the class. UNets have none: nothing is built."""
    missing = [(name, buf) for name, mod in model.named_modules() for buf in mod._non_persistent_buffers_set
               if getattr(mod, buf) is not None and getattr(mod, buf).is_meta]
    if not missing:
        return
    reference = cls.from_config(config)  # transient float copy; its buffers are what __init__ computes
    for name, buf in missing:
        model.get_submodule(name).register_buffer(buf, getattr(reference.get_submodule(name), buf), persistent=False)


def build_deployed(unet_cls: type[nn.Module], config: dict[str, Any], layers: dict[str, Any],
                   processors: dict[str, Any], spec: QuantSpec | None = None) -> nn.Module:
    """The deployed structure of ``unet_cls(config)`` on the meta device (load tensors with
    :func:`load_deployed_state`). Raises ``ValueError`` naming any map entry the model cannot take, and
    any that is not what ``spec`` plans for it (:func:`check_map_against_model`)."""
    with torch.device("meta"):
        model = unet_cls.from_config(config)
    _compute_buffers(model, unet_cls, config)
    check_map_against_model(model, layers, processors, spec)
    # Processors first: installing one reads its attention's to_q device, still a plain meta Linear here.
    for pname, entry in processors.items():
        attn_name = pname.removesuffix(".processor")
        attn = dict(model.named_modules()).get(attn_name)
        if not pname.endswith(".processor") or not isinstance(attn, Attention):
            raise ValueError(f"attention processor {pname!r} of the quantization map is not in the model")
        try:
            act = ActQuantConfig(**entry["config"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"quantization map entry of processor {pname!r} is malformed: {err!r}") from err
        install_quant_processor(attn, act, attn_name)
    modules = dict(model.named_modules())
    for name, entry in layers.items():
        float_type, fmt, layer_config = _layer_parts(name, entry)
        module = modules.get(name)
        if module is None:
            raise ValueError(f"layer {name!r} of the quantization map does not exist in the model")
        if type(module) is not float_type:
            raise ValueError(f"layer {name!r}: the map expects {float_type.__name__}, "
                             f"the model has {type(module).__name__}")
        try:
            deployed = DEPLOYED_LAYERS[float_type](module, fmt, layer_config, device="meta")
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from err
        set_submodule(model, name, deployed)
    for name, m in model.named_modules():
        if isinstance(m, ActivationQuantizer):
            m.name = name
    attach_timestep_router(model)
    return model


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"tensors do not match the quantization map: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    for key, t in tensors.items():
        want = expected[key]
        if t.shape != want.shape or t.dtype != want.dtype:
            raise ValueError(f"tensor {key!r}: saved {t.dtype} {tuple(t.shape)}, "
                             f"the quantization map needs {want.dtype} {tuple(want.shape)}")


def load_deployed_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Check ``tensors`` against ``model``'s structure (names, shapes, dtypes, integer ranges, calibration)
    and assign them. Every problem raises ``ValueError`` naming the tensor or layer."""
    _check_tensors(model, tensors)
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"tensors {left[:10]} were not loaded (not persistent in this model class)")
    for name, m in model.named_modules():
        if isinstance(m, DeployedLayer):
            try:
                m.validate()
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from err
        elif isinstance(m, ActivationQuantizer) and not m.is_off and not bool(m.initialized):
            raise ValueError(f"activation quantizer {name!r} is not calibrated (initialized is False)")


def deployed_layers(model: nn.Module) -> list[tuple[str, DeployedLayer]]:
    """All deployed layers under ``model`` as ``(name, layer)``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DeployedLayer)]


def set_execution(model: nn.Module, mode: str) -> dict[str, str]:
    """Set every deployed layer to ``dequant``, ``cached`` or ``int``; returns ``{layer: reason}`` for the
    layers that ``int`` could not run (they execute ``dequant``)."""
    fallbacks = {}
    for name, layer in deployed_layers(model):
        if layer.set_execution(mode) != mode:
            fallbacks[name] = layer.fallback_reason
    return fallbacks


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (counted once) plus what the execution modes derive from them."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr() or id(t)] = t.numel() * t.element_size()
    return sum(seen.values()) + sum(layer.derived_bytes() for _, layer in deployed_layers(model))
