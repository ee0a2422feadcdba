"""Give the heap memory a finished phase freed back to the operating system (glibc's ``malloc_trim``).

glibc keeps freed heap memory mapped for reuse, so after a phase that frees a lot (the final stage's rollout
graphs) the resident set stays at that phase's peak, and a next phase that allocates differently shaped buffers
(sampling, the Inception network's activations) adds to it: on the digits main job the process held 1.06 GB after
the final stage, and 0.68 GB once trimmed before the FID evaluation (docs/PERFORMANCE.md). Trimming at such a
boundary costs a few milliseconds. Elsewhere (musl, macOS, Windows) there is nothing to trim and the call does
only the garbage collection.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def release_freed_memory() -> bool:
    """Collect garbage, then return free heap pages to the OS; True when glibc's ``malloc_trim`` ran."""
    gc.collect()
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True
