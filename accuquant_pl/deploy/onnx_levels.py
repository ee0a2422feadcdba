"""Does the runtime quantize as the PyTorch model does? Integer levels of every activation quantizer, compared.

The PyTorch side is the packed export (``load_quantized``): a pre-hook on each activation quantizer computes the
levels it makes of its input. The runtime side is the ONNX export in ONNX Runtime with every ``QuantizeLinear``
(after its ``Clip``, for a narrow range) made a graph output; the export names those nodes after their quantizers.
Float rounding (the runtime divides by the scale, PyTorch multiplies by its inverse; integer GEMMs and fused
kernels sum in another order) can move a value that sits at a rounding tie to the neighbouring level. Such a flip
changes what every later layer sees, so downstream quantizers can differ by more (how much depends on how strongly
the network amplifies a one-level change). The test of a correct graph is therefore the *first* quantizer, in
forward order, whose levels differ: a wrong scale, zero point or layout shows there as a large difference, a
rounding flip as a difference of 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accuquant_pl.deploy.artifact import load_quantized
from accuquant_pl.deploy.onnx_export import ONNX_NAME, GraphInput, read_onnx_folder, require
from accuquant_pl.deploy.onnx_ops import Quantize
from accuquant_pl.deploy.onnx_runtime import graph_feeds, widen_int4
from accuquant_pl.quant.affine import MIN_SCALE
from accuquant_pl.quant.quantizers import ActivationQuantizer


@dataclass
class LevelAgreement:
    """One quantizer's levels, runtime against PyTorch, over the elements of one forward."""

    max_difference: int
    differing: int
    elements: int

    @property
    def differing_share(self) -> float:
        return self.differing / max(self.elements, 1)


def torch_levels(folder: str | Path, inputs: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Levels each activation quantizer of the packed export makes in one forward (a list: a quantizer can run
    more than once per forward)."""
    model = load_quantized(folder)
    levels: dict[str, list[torch.Tensor]] = {}

    def record(module: ActivationQuantizer, args: tuple) -> None:
        x = args[0]
        scale, zero_point = module.qparams_for(x, module.scale.detach().clamp_min(MIN_SCALE))  # as its forward
        # qparams_for shapes them to broadcast against x, so no axis is passed.
        q = Quantize.apply(x, scale, zero_point, module.quant_min, module.quant_max, None)
        levels.setdefault(module.name, []).append(q.to(torch.int32))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, ActivationQuantizer) and not m.is_off]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return levels


def runtime_levels(onnx_folder: str | Path, feeds: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    """Levels of every ``QuantizeLinear`` of the ONNX export in ONNX Runtime, by quantizer name (the folder was
    checked by :func:`~accuquant_pl.deploy.onnx_export.read_onnx_folder`)."""
    onnx, ort = require("onnx"), require("onnxruntime")
    proto = onnx.load(str(Path(onnx_folder) / ONNX_NAME))
    widen_int4(proto)
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    probes: list[tuple[str, str]] = []
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            out = node.output[0]
            clip = [c for c in consumers.get(out, []) if c.op_type == "Clip"]
            probes.append((node.name, clip[0].output[0] if clip else out))
    existing = {o.name for o in proto.graph.output}
    for _, value in probes:
        if value not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=value))
            existing.add(value)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    levels: dict[str, list[torch.Tensor]] = {}
    for name, value in probes:
        levels.setdefault(name.split("#")[0], []).append(torch.from_numpy(results[value].astype("int32")))
    return levels


def _aligned(runtime: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    # The graph quantizes the key transposed and linear inputs as rows: same elements, other layout.
    if runtime.shape != reference.shape and runtime.dim() >= 2 and runtime.transpose(-1, -2).shape == reference.shape:
        return runtime.transpose(-1, -2)
    return runtime.reshape(reference.shape)


def first_divergence(report: dict[str, LevelAgreement]) -> tuple[str, LevelAgreement] | None:
    """The first quantizer in forward order whose runtime levels differ from PyTorch's (None if none does)."""
    return next(((name, r) for name, r in report.items() if r.differing), None)


def level_agreement(quantized_folder: str | Path, onnx_folder: str | Path,
                    inputs: dict[str, torch.Tensor]) -> dict[str, LevelAgreement]:
    """Per activation quantizer, in forward order: the largest level difference between ONNX Runtime and the
    packed PyTorch export, and how many elements differ, for one forward on ``inputs`` (the denoiser's keyword arguments, sample under
    ``sample`` or ``hidden_states``; ``timestep`` one per sample)."""
    meta = read_onnx_folder(onnx_folder)
    reference = torch_levels(quantized_folder, inputs)
    given = {("sample" if k == "hidden_states" else k): v for k, v in inputs.items()}
    specs = [GraphInput.from_dict(i) for i in meta["inputs"]]
    runtime = runtime_levels(onnx_folder, graph_feeds(specs, given.pop("sample"), given.pop("timestep"), given))
    if set(runtime) != set(reference):
        raise RuntimeError(f"quantizers differ: only in the graph {sorted(set(runtime) - set(reference))[:5]}, "
                           f"only in PyTorch {sorted(set(reference) - set(runtime))[:5]}")
    report = {}
    for name, refs in reference.items():
        if len(refs) != len(runtime[name]):
            raise RuntimeError(f"{name!r} ran {len(refs)} times in PyTorch, {len(runtime[name])} in the graph")
        diffs = [(_aligned(r, q) - q).abs() for r, q in zip(runtime[name], refs, strict=True)]
        report[name] = LevelAgreement(max(int(d.max()) for d in diffs), sum(int((d > 0).sum()) for d in diffs),
                                      sum(d.numel() for d in diffs))
    return report
