"""The ONNX export run in ONNX Runtime, standing in for the diffusers denoiser.

:class:`OnnxDenoiser` takes what a pipeline gives its ``unet`` / ``transformer`` (``sample`` or ``hidden_states``,
``timestep``, class labels or prompt embeddings, ``return_dict``) and returns diffusers' output object, so
``quantized_pipeline``, ``main.py predict`` and ``main.py test`` run on it unchanged. Before the session is built,
INT4 weight initializers are widened to int8 in memory: ONNX Runtime's integer GEMM (``MatMulIntegerToFloat``,
which its graph optimizer makes of ``DequantizeLinear -> MatMul``) takes 8-bit operands; the file keeps the nibbles.

The graph holds one timestep group per forward (its activation ranges): a batch whose samples sit in different
groups is run group by group, so every sample gets its own group's ranges, as in the PyTorch model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from accuquant_pl.denoisers import SUPPORTED_TRANSFORMERS
from accuquant_pl.deploy.artifact import UNET_CONFIG, load_quantized
from accuquant_pl.deploy.onnx_export import (
    ONNX_NAME,
    GraphInput,
    is_onnx_folder,
    read_onnx_folder,
    require,
)
from accuquant_pl.io import readable_directory


def widen_int4(proto: Any) -> int:
    """Rewrite the INT4 initializers of ``proto`` as int8 (same values); returns how many."""
    from onnx import TensorProto, numpy_helper

    done = 0
    for i, init in enumerate(proto.graph.initializer):
        if init.data_type == TensorProto.INT4:
            values = numpy_helper.to_array(init).astype(np.int8)
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, init.name))
            done += 1
    return done


def graph_feeds(inputs: list[GraphInput], x: torch.Tensor, t: torch.Tensor, given: dict[str, Any]) -> dict[str, Any]:
    """The session's input arrays: sample, timestep (one per sample) and the conditioning inputs the graph takes
    (a prompt mask that is not given attends to every token, as the pipelines without masks do)."""
    feeds = {"sample": x, "timestep": t}
    for spec in inputs[2:]:
        value = given.get(spec.name)
        if value is None and spec.name == "encoder_attention_mask" and given.get("encoder_hidden_states") is not None:
            value = torch.ones(x.shape[0], given["encoder_hidden_states"].shape[1])
        if value is None:
            raise ValueError(f"the exported denoiser needs {spec.name!r}")
        value = torch.as_tensor(value)
        if value.shape[0] != x.shape[0]:
            raise ValueError(f"{spec.name!r} has a batch of {value.shape[0]}, the sample {x.shape[0]}")
        feeds[spec.name] = value
    dtypes = {i.name: i.dtype for i in inputs}
    return {k: v.detach().cpu().numpy().astype(dtypes[k]) for k, v in feeds.items()}


class OnnxDenoiser(nn.Module):
    """An ONNX export folder in an ONNX Runtime session, called like the diffusers denoiser it was exported from.

    Args:
        folder: a folder written by ``export_onnx`` (checked against its ``checksums.json``).
        threads: ONNX Runtime intra-op threads (None: the runtime's default, one per core).
        providers: execution providers, e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` (default CPU).
            The CUDA and TensorRT providers take the same QDQ graph (see docs/EXPORT.md).
        fixed_shapes: one session per input shape (batch, prompt length), each with those sizes fixed, so that
            ONNX Runtime folds the graph's shape arithmetic away (measured: a third less time per forward at batch
            1 on the digits UNet, no change at 16 and 64). Each session holds its own copy of the prepared weights:
            ``False`` keeps one session for every shape. At most ``MAX_SESSIONS`` shapes are kept.
    """

    MAX_SESSIONS = 4

    def __init__(self, folder: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 fixed_shapes: bool = True) -> None:
        super().__init__()
        require("onnxruntime")
        onnx = require("onnx")
        folder = readable_directory(folder)
        self.meta = read_onnx_folder(folder)
        self.folder = folder
        self.denoiser_class: str = self.meta["model_class"]
        self.config = FrozenDict(json.loads((folder / UNET_CONFIG).read_text()))
        self.inputs = [GraphInput.from_dict(i) for i in self.meta["inputs"]]
        self.names = [i.name for i in self.inputs]
        self.use_additional_conditions = "resolution" in self.names
        self.register_buffer("boundaries", torch.tensor(self.meta["timestep_boundaries"], dtype=torch.float32),
                             persistent=False)
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads} must be >= 1 (or None for the runtime's default)")
        self.threads, self.providers, self.fixed_shapes = threads, providers or ["CPUExecutionProvider"], fixed_shapes
        proto = onnx.load(str(folder / ONNX_NAME))
        widen_int4(proto)
        self._model_bytes = proto.SerializeToString()
        self._sessions: dict[tuple[tuple[str, int], ...], Any] = {}
        self.session = self._session(())  # the dynamic-shape session: checks the graph loads, serves any shape

    def _session(self, sizes: tuple[tuple[str, int], ...]) -> Any:
        """The session whose named dynamic dimensions are fixed to ``sizes`` (``()``: all dynamic)."""
        if sizes in self._sessions:
            return self._sessions[sizes]
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        for name, size in sizes:
            options.add_free_dimension_override_by_name(name, size)
        session = ort.InferenceSession(self._model_bytes, options, providers=self.providers)
        if sizes:
            fixed = [k for k in self._sessions if k]
            if len(fixed) >= self.MAX_SESSIONS:
                del self._sessions[fixed[0]]
        self._sessions[sizes] = session
        return session

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs[0].shape[1:])

    def _run(self, x: torch.Tensor, t: torch.Tensor, given: dict[str, Any]) -> torch.Tensor:
        feeds = graph_feeds(self.inputs, x, t, given)
        sizes: tuple[tuple[str, int], ...] = ()
        if self.fixed_shapes:
            named = {}
            for spec in self.inputs:
                named.update({d: feeds[spec.name].shape[a] for a, d in enumerate(spec.shape) if isinstance(d, str)})
            sizes = tuple(sorted(named.items()))
        return torch.from_numpy(self._session(sizes).run(None, feeds)[0])

    def forward(self, sample: torch.Tensor | None = None, timestep: torch.Tensor | float | None = None,
                encoder_hidden_states: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, added_cond_kwargs: dict | None = None,
                hidden_states: torch.Tensor | None = None, return_dict: bool = True, **unused: Any) -> Any:
        """The denoiser's prediction; keyword names as the diffusers class (``hidden_states`` for transformers)."""
        x = sample if sample is not None else hidden_states
        if x is None or timestep is None:
            raise ValueError("the exported denoiser needs a sample (or hidden_states) and a timestep")
        if tuple(x.shape[1:]) != self._sample_shape() or x.shape[0] < 1:
            raise ValueError(f"sample of shape {tuple(x.shape)}: the ONNX graph was exported for "
                             f"(batch, {', '.join(map(str, self._sample_shape()))})")
        ignored = [k for k, v in unused.items() if v is not None]
        if ignored:
            raise ValueError(f"the exported {self.denoiser_class} takes no {ignored}")
        given: dict[str, Any] = {"class_labels": class_labels, "encoder_hidden_states": encoder_hidden_states,
                                 "encoder_attention_mask": encoder_attention_mask, **(added_cond_kwargs or {})}
        extra = [k for k, v in given.items() if v is not None and k not in self.names]
        if extra:
            raise ValueError(f"the exported {self.denoiser_class} takes no {extra} (graph inputs: {self.names})")
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).cpu()
        if t.numel() == 1:
            t = t.repeat(x.shape[0])
        if t.numel() != x.shape[0]:
            raise ValueError(f"{t.numel()} timesteps for a batch of {x.shape[0]} samples")
        groups = torch.bucketize(t, self.boundaries, right=True)
        fixed = self.meta.get("timestep_group")
        if fixed is not None and bool((groups != fixed).any()):
            raise ValueError(f"this graph holds the activation ranges of timestep group {fixed} only "
                             f"(boundaries {self.meta['timestep_boundaries']}); timesteps {sorted(set(t.tolist()))[:8]} "
                             "fall outside it: use the graph exported for their group")
        if bool((groups == groups[0]).all()):
            out = self._run(x, t, given)
        else:  # one timestep group per graph run: each group's rows on their own
            out = None
            for g in groups.unique().tolist():
                rows = (groups == g).nonzero().reshape(-1)
                part = self._run(x[rows], t[rows], {k: v[rows] if isinstance(v, torch.Tensor) else v
                                                    for k, v in given.items()})
                out = part.new_empty(x.shape[0], *part.shape[1:]) if out is None else out
                out[rows] = part
        out = out.to(x.device)
        cls = Transformer2DModelOutput if self.denoiser_class in SUPPORTED_TRANSFORMERS else UNet2DOutput
        return cls(sample=out) if return_dict else (out,)

    def extra_repr(self) -> str:
        return f"{self.denoiser_class}, folder={str(self.folder)!r}, providers={self.session.get_providers()}"


def load_exported(folder: str | Path, execution: str = "dequant", onnx_threads: int | None = None,
                  onnx_providers: list[str] | None = None) -> nn.Module:
    """The denoiser of an exported folder: an :class:`OnnxDenoiser` for an ONNX export folder, else the packed
    PyTorch model (``load_quantized(folder, execution)``)."""
    if is_onnx_folder(folder):
        return OnnxDenoiser(folder, onnx_threads, onnx_providers)
    return load_quantized(folder, execution)
