"""Peak-memory probes that work on any device: bytes of tensors saved for backward, and of all live tensors.

Used by the tests (O(1)-memory properties of the gradient modes) and by benchmarks/memory_vs_group_size.py.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class SavedTensorBytes:
    """Bytes of tensors saved for backward that are alive, and their peak (saved_tensors_hooks)."""

    class _Box:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor: Tensor):
            self.tensor = tensor

    def __init__(self):
        self.live = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor):
        box, nbytes = self._Box(t), t.untyped_storage().nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._free, nbytes)
        return box

    def _unpack(self, box):
        return box.tensor

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages produced by aten ops inside the block that are alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st not in self._seen:
                    nbytes = st.nbytes()
                    self._seen[st] = nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes
