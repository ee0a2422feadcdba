"""release_freed_memory (accuquant_pl/host_memory.py): freed heap memory leaves the resident set."""

from __future__ import annotations

import subprocess
import sys

import pytest

from accuquant_pl import host_memory

SCRIPT = """
import torch
from accuquant_pl.host_memory import release_freed_memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))

before = rss_mb()
chunks = [torch.ones(25_000) for _ in range(3000)]  # 100 KB each: heap allocations, not mmaps
grown = rss_mb()
del chunks
freed = rss_mb()
ran = release_freed_memory()
print(before, grown, freed, rss_mb(), ran)
"""


@pytest.mark.skipif(host_memory._LIBC is None or not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_heap_memory_leaves_the_resident_set():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    before, grown, freed, trimmed = map(int, out[:4])
    assert out[4] == "True"
    assert grown - before >= 250  # 300 MB allocated
    if freed - before < 250:  # the allocator gave it back by itself (e.g. MALLOC_TRIM_THRESHOLD_ set, jemalloc)
        pytest.skip("this allocator returns freed memory on its own: nothing to show")
    assert trimmed - before <= 50


def test_without_glibc_it_only_collects(monkeypatch):
    monkeypatch.setattr(host_memory, "_LIBC", None)
    assert host_memory.release_freed_memory() is False
