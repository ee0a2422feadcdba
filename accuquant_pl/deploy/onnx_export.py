"""ONNX export of a calibrated model folder: one QDQ graph for ONNX Runtime (CPU, CUDA) and TensorRT.

``export_onnx(folder, out)`` reads an ``ExportQuantized`` folder (checked as every load is), swaps its layers for
their export form (:mod:`.onnx_layers`) and traces it with the TorchScript ONNX exporter into ``out``:

* ``model.onnx``: weights as integer initializers (int8; 2-4-bit weights as ONNX ``INT4``, two per byte, unless
  ``int4=False``) with ``DequantizeLinear``; ``QuantizeLinear -> DequantizeLinear`` at every activation the PyTorch
  model quantizes (layer inputs, both halves of a split skip concatenation, the four attention matmul operands),
  with its calibrated scale and zero point. Timestep-grouped ranges are tables indexed by the group of the
  ``timestep`` input, so one graph serves every step. Batch (and prompt length) are dynamic; the resolution is the
  model's ``sample_size``.
* ``onnx_export.json``: inputs, resolution, timestep boundaries, graph layout, the FP model and sampler the
  calibration recorded, the SHA-256 of the source folder's checksum list.
* ``unet_config.json`` and ``scheduler_config.json`` from the source folder (what a pipeline needs besides the
  graph), and ``checksums.json`` over every file, written last: an edited file is refused when loading.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from accuquant_pl.denoisers import SUPPORTED_TRANSFORMERS
from accuquant_pl.deploy.artifact import (
    CHECKSUMS,
    MAP_NAME,
    ONNX_META,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    load_quantized,
    recorded_pretrained,
    verify_checksums,
)
from accuquant_pl.deploy.onnx_layers import CONV_LAYOUTS, OnnxConv2d, OnnxGraph, OnnxLinear, to_export_form
from accuquant_pl.io import atomic_directory, atomic_path, atomic_write_text, readable_directory, sha256_file
from accuquant_pl.quant.convert import SPEC_ATTR

ONNX_NAME = "model.onnx"
ONNX_FORMAT = "accuquant-pl/onnx-qdq"
ONNX_VERSION = 1
OPSET = 21  # INT4 initializers and per-axis DequantizeLinear of every integer type
INSTALL_HINT = "pip install 'accuquant-pl[onnx]'"


def require(module: str) -> Any:
    """Import ``onnx`` / ``onnxruntime``, or ``ImportError`` naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is not installed ({err}); {INSTALL_HINT}") from err


@dataclass(frozen=True)
class GraphInput:
    """One input of the graph: name, element type, shape with named dynamic axes."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def example(self, sizes: dict[str, int]) -> torch.Tensor:
        shape = [sizes[d] if isinstance(d, str) else d for d in self.shape]
        if self.dtype == "int64":
            return torch.zeros(shape, dtype=torch.int64)
        return torch.ones(shape) if self.name == "encoder_attention_mask" else torch.randn(shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphInput:
        """Inverse of :meth:`to_dict` (an entry of ``onnx_export.json``'s ``inputs``)."""
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


def graph_inputs(model: nn.Module) -> tuple[list[GraphInput], str, dict[str, Any]]:
    """The graph inputs of a denoiser (after ``sample`` and ``timestep``: what its pipeline gives it), the name its
    forward takes the sample under, and the keyword arguments fixed at export."""
    cfg, name = model.config, type(model).__name__
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    inputs = [GraphInput("sample", "float32", ("batch", cfg.in_channels, size, size)),
              GraphInput("timestep", "float32", ("batch",))]
    labels = GraphInput("class_labels", "int64", ("batch",))
    fixed: dict[str, Any] = {}
    if name == "UNet2DModel":
        if cfg.num_class_embeds is not None or cfg.class_embed_type is not None:
            inputs.append(labels)
    elif name == "UNet2DConditionModel":
        if not isinstance(cfg.cross_attention_dim, int):
            raise NotImplementedError(f"a UNet2DConditionModel with per-block cross_attention_dim "
                                      f"{cfg.cross_attention_dim!r} cannot be exported to ONNX")
        if cfg.addition_embed_type is not None:
            raise NotImplementedError(f"UNet2DConditionModel addition_embed_type={cfg.addition_embed_type!r} "
                                      "(SDXL-style added conditions) cannot be exported to ONNX yet")
        inputs.append(GraphInput("encoder_hidden_states", "float32", ("batch", "tokens", cfg.cross_attention_dim)))
        if cfg.num_class_embeds is not None or cfg.class_embed_type is not None:
            inputs.append(labels)
    elif name == "DiTTransformer2DModel":
        inputs.append(labels)
    elif name == "PixArtTransformer2DModel":
        inputs += [GraphInput("encoder_hidden_states", "float32", ("batch", "tokens", cfg.caption_channels)),
                   GraphInput("encoder_attention_mask", "float32", ("batch", "tokens"))]
        if model.use_additional_conditions:
            inputs += [GraphInput("resolution", "float32", ("batch", 2)),
                       GraphInput("aspect_ratio", "float32", ("batch", 1))]
        else:
            fixed["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    else:
        raise NotImplementedError(f"the ONNX export does not know the inputs of a {name}")
    return inputs, ("hidden_states" if name in SUPPORTED_TRANSFORMERS else "sample"), fixed


def _int4_initializers(graph: OnnxGraph) -> dict[str, int]:
    """Initializer names of the weight levels and zero points of the layers quantized at 4 bits or fewer, with the
    shift that maps their int8 levels into INT4's [-8, 7] (the zero point moves with them)."""
    names: dict[str, int] = {}
    for name, module in graph.named_modules():
        if isinstance(module, (OnnxConv2d, OnnxLinear)) and module.bits <= 4:
            shift = 0 if module.symmetric else 8  # asymmetric levels 0..15 -> -8..7
            for key, _ in module.named_buffers(recurse=False):
                if key.startswith("weight_levels") or key == "weight_zero_point":
                    names[f"{name}.{key}"] = shift
    return names


def _pack_int4(proto: Any, names: dict[str, int]) -> int:
    """Rewrite the named int8 initializers as INT4 (minus their shift); returns how many were rewritten."""
    import ml_dtypes
    from onnx import numpy_helper

    done = 0
    for i, init in enumerate(proto.graph.initializer):
        if init.name in names:
            values = numpy_helper.to_array(init).astype("int16") - names[init.name]
            if values.min() < -8 or values.max() > 7:
                raise RuntimeError(f"initializer {init.name!r} holds levels outside INT4")
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(values.astype(ml_dtypes.int4), init.name))
            done += 1
    return done


def _compact_names(proto: Any, quantizers: list[str]) -> None:
    """Short value and node names (the tracer's scope paths made most of a small model's file), except the graph's
    inputs, outputs and initializers; each ``QuantizeLinear`` node is named after its quantizer (``quantizers`` in
    graph order; ``name#k`` for its k-th further run in one forward), so that runtime levels can be matched to the
    PyTorch model's."""
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {i.name for i in graph.initializer}
    renamed: dict[str, str] = {}
    q_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    if len(q_nodes) != len(quantizers):
        raise RuntimeError(f"the graph has {len(q_nodes)} QuantizeLinear nodes for {len(quantizers)} quantizations")
    names, seen = iter(quantizers), Counter()
    for i, node in enumerate(graph.node):
        if node.op_type == "QuantizeLinear":
            # A quantizer that runs again in the same forward (DiT's shared embedders) gets '#k' appended.
            name = next(names)
            node.name = f"{name}#{seen[name]}" if seen[name] else name
            seen[name] += 1
        else:
            node.name = f"n{i}"
        for j, out in enumerate(node.output):
            if out and out not in keep:
                renamed[out] = f"v{i}_{j}" if j else f"v{i}"
                node.output[j] = renamed[out]
        for j, inp in enumerate(node.input):
            node.input[j] = renamed.get(inp, inp)
        for attr in node.attribute:
            if attr.HasField("g"):  # an If branch reads outer values by name
                _rename_inputs(attr.g, renamed)


def _rename_inputs(graph: Any, renamed: dict[str, str]) -> None:
    for node in graph.node:
        for j, inp in enumerate(node.input):
            node.input[j] = renamed.get(inp, inp)
        for attr in node.attribute:
            if attr.HasField("g"):
                _rename_inputs(attr.g, renamed)


def trace(graph: OnnxGraph, inputs: list[GraphInput], path: Path, example_batch: int = 2,
          example_tokens: int = 8, opset: int = OPSET) -> Any:
    """Trace ``graph`` (positional ``inputs``) with the TorchScript ONNX exporter into ``path``; returns the loaded
    model proto (batch and prompt length dynamic, ``out_sample`` the output)."""
    onnx = require("onnx")
    sizes = {"batch": example_batch, "tokens": example_tokens}
    examples = tuple(i.example(sizes) for i in inputs)
    dynamic = {i.name: {a: d for a, d in enumerate(i.shape) if isinstance(d, str)} for i in inputs}
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python-side shape read; the resolution is fixed by design.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.eval(), examples, str(path), input_names=[i.name for i in inputs],
                          output_names=["out_sample"], dynamic_axes={**dynamic, "out_sample": {0: "batch"}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    return onnx.load(str(path))


def write_onnx_folder(out: str | Path, proto: Any, meta: dict[str, Any], configs: dict[str, str]) -> Path:
    """Write an ONNX export folder atomically: ``model.onnx`` (checked by ``onnx.checker``), ``onnx_export.json``
    (``meta`` with this format's name and version), the ``configs`` files (name -> text) and ``checksums.json``."""
    onnx = require("onnx")
    onnx.checker.check_model(proto, full_check=True)
    with atomic_directory(Path(out)) as tmp:
        with atomic_path(tmp / ONNX_NAME) as path:
            onnx.save(proto, str(path))
        meta = {"format": ONNX_FORMAT, "version": ONNX_VERSION, "opset": OPSET, **meta}  # meta may name its opset
        atomic_write_text(tmp / ONNX_META, json.dumps(meta, indent=2) + "\n")
        for name, text in configs.items():
            atomic_write_text(tmp / name, text)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        atomic_write_text(tmp / CHECKSUMS, json.dumps({"format": ONNX_FORMAT, "sha256": files}, indent=2) + "\n")
    return Path(out)


def export_onnx(folder: str | Path, out: str | Path, conv_layout: str = "matmul", int4: bool = True,
                timestep_group: int | None = None, example_batch: int = 2, example_tokens: int = 8) -> Path:
    """Write the ONNX export of the quantized model folder ``folder`` to the folder ``out`` (replaced atomically).

    Args:
        folder: an ``ExportQuantized`` / ``export_quantized`` folder (its checksums and map are checked).
        out: the ONNX folder to write (``model.onnx``, ``onnx_export.json``, configs, ``checksums.json``).
        conv_layout: ``matmul`` (patches times the weight matrix: int8 GEMMs in ONNX Runtime on CPU) or ``conv``
            (``DequantizeLinear -> Conv``, the form TensorRT builds int8 convolutions from).
        int4: store 2-4-bit weights as ONNX INT4 (two per byte); False keeps them in int8.
        timestep_group: export only this timestep group's activation ranges, as constants (None: every group, the
            forward's chosen from its timestep). TensorRT needs constant scales: one graph per group.
        example_batch, example_tokens: sizes of the tracing inputs (the graph's batch and prompt length are
            dynamic).

    Raises ``ImportError`` (with the install hint) without ``onnx``, ``NotImplementedError`` naming a layer or
    denoiser the graph cannot express, and whatever ``load_quantized`` raises for a damaged folder; nothing is
    written then.
    """
    require("onnx")
    if conv_layout not in CONV_LAYOUTS:
        raise ValueError(f"conv_layout {conv_layout!r} is not one of {CONV_LAYOUTS}")
    source = readable_directory(folder)
    model = load_quantized(source)
    spec = getattr(model, SPEC_ATTR)
    inputs, sample_key, fixed = graph_inputs(model)
    cls_name = type(model).__name__
    group = to_export_form(model, list(spec.act_timestep_boundaries or []), conv_layout, timestep_group)
    graph = OnnxGraph(model, group, [i.name for i in inputs], sample_key, fixed)
    qmap = json.loads((source / MAP_NAME).read_text())
    pretrained = recorded_pretrained(qmap)
    with tempfile.TemporaryDirectory() as tmp:
        proto = trace(graph, inputs, Path(tmp) / ONNX_NAME, example_batch, example_tokens)
    _compact_names(proto, group.quantized)
    packed = _pack_int4(proto, _int4_initializers(graph)) if int4 else 0
    meta = {
        "model_class": cls_name,
        "inputs": [i.to_dict() for i in inputs],
        "sample_key": sample_key,
        "timestep_boundaries": list(group.boundaries),
        "timestep_group": timestep_group,
        "conv_layout": conv_layout,
        "int4_initializers": packed,
        "spec": qmap.get("spec"),
        "source": {"folder": str(source), "checksums_sha256": sha256_file(source / CHECKSUMS)},
        **({"pretrained": pretrained} if pretrained is not None else {}),
        **({"sampler": qmap["sampler"]} if "sampler" in qmap else {}),
    }
    configs = {name: (source / name).read_text() for name in (UNET_CONFIG, SCHEDULER_CONFIG)
               if (source / name).is_file()}
    return write_onnx_folder(out, proto, meta, configs)


def export_float_onnx(pretrained: str | Path, out: str | Path, opset: int = 17) -> Path:
    """The FP model of a diffusers folder (or Hub id) as an ONNX export folder of the same form (inputs,
    metadata): the float baseline that :class:`~accuquant_pl.deploy.onnx_runtime.OnnxDenoiser` runs alike. Opset 17
    by default: what a user exports a float model with, and what ONNX Runtime's own ``quantize_static`` takes (at
    opset 21 its QDQ output for these graphs does not load: an int8 ``output_dtype`` with a uint8 zero point)."""
    from accuquant_pl.deploy.onnx_layers import TimestepGroup
    from accuquant_pl.diffusion.loading import load_denoiser, load_scheduler_config

    model = load_denoiser(pretrained).eval()
    inputs, sample_key, fixed = graph_inputs(model)
    graph = OnnxGraph(model, TimestepGroup([]), [i.name for i in inputs], sample_key, fixed)
    with tempfile.TemporaryDirectory() as tmp:
        proto = trace(graph, inputs, Path(tmp) / ONNX_NAME, opset=opset)
    meta = {"model_class": type(model).__name__, "opset": opset, "inputs": [i.to_dict() for i in inputs], "sample_key": sample_key,
            "timestep_boundaries": [], "conv_layout": None, "int4_initializers": 0, "spec": None,
            "source": {"folder": str(pretrained)}}
    configs = {UNET_CONFIG: model.to_json_string(),
               SCHEDULER_CONFIG: json.dumps(load_scheduler_config(pretrained), indent=2, default=list)}
    return write_onnx_folder(out, proto, meta, configs)


def is_onnx_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds an ONNX export (rather than a packed PyTorch export)."""
    return (Path(folder) / ONNX_META).is_file()


def read_onnx_folder(folder: str | Path) -> dict[str, Any]:
    """The checked metadata of an ONNX export folder: every file must match ``checksums.json`` (an edited graph or
    config is refused, naming the file) and the format must be this version's."""
    folder = readable_directory(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"ONNX export folder {str(folder)!r} does not exist")
    if not is_onnx_folder(folder):
        raise FileNotFoundError(f"{str(folder)!r} is not an ONNX export folder (no {ONNX_META}); write one with "
                                "accuquant_pl.export_onnx(quantized_folder, out)")
    verify_checksums(folder, ONNX_FORMAT, (ONNX_NAME, ONNX_META, UNET_CONFIG))
    meta = json.loads((folder / ONNX_META).read_text())
    if (meta.get("format"), meta.get("version")) != (ONNX_FORMAT, ONNX_VERSION):
        raise ValueError(f"{folder / ONNX_META}: format {meta.get('format')!r} v{meta.get('version')} is not "
                         f"{ONNX_FORMAT} v{ONNX_VERSION}; export it again with this version of accuquant-pl")
    return meta


def main(argv: list[str] | None = None) -> None:
    """``accuquant-export-onnx QUANTIZED_FOLDER OUT [--conv-layout conv] [--int8-weights] [--timestep-group G]``"""
    import argparse

    parser = argparse.ArgumentParser(prog="accuquant-export-onnx", description=export_onnx.__doc__.split("\n")[0])
    parser.add_argument("folder", help="an ExportQuantized folder")
    parser.add_argument("out", help="the ONNX folder to write")
    parser.add_argument("--conv-layout", choices=CONV_LAYOUTS, default="matmul",
                        help="matmul: int8 GEMMs in ONNX Runtime on CPU; conv: DequantizeLinear -> Conv (TensorRT)")
    parser.add_argument("--int8-weights", action="store_true", help="keep 2-4-bit weights in int8 instead of INT4")
    parser.add_argument("--timestep-group", type=int, default=None,
                        help="only this timestep group's activation ranges, as constants (one graph per group for "
                             "TensorRT)")
    args = parser.parse_args(argv)
    out = export_onnx(args.folder, args.out, conv_layout=args.conv_layout, int4=not args.int8_weights,
                      timestep_group=args.timestep_group)
    print(f"wrote {out / ONNX_NAME} ({(out / ONNX_NAME).stat().st_size / 1e6:.3f} MB)")


if __name__ == "__main__":
    main()
