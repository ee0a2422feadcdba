"""python -m benchmarks.throughput and benchmarks.memory_vs_group_size run end to end on CPU at their smallest settings.

They call the objectives directly (not through main.py), so a signature change in calibration/objectives.py
or calibration/rollout.py breaks them silently unless they run: throughput.py did break once and was found
only on a GPU lease. Slow (throughput.py builds a 35.7M-parameter CIFAR-size UNet and its trajectory)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _run(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]


def test_throughput_prints_one_row_per_objective():
    rows = _run("-m", "benchmarks.throughput", "--device", "cpu", "--batch-size", "1", "--iters", "1",
                "--group-sizes", "1,2")
    labels = [row.split("|")[1].strip() for row in rows[1:]]
    assert labels == ["per_step (Q-Diffusion/BRECQ)", "accuquant checkpointed", "accuquant checkpointed"], rows
    assert all(float(row.split("|")[3]) > 0 for row in rows[1:])  # s/iter measured


def test_memory_vs_group_size_prints_every_mode_and_n():
    rows = _run("-m", "benchmarks.memory_vs_group_size", "--device", "cpu", "--models", "digits", "--group-sizes", "1,2",
                "--iters", "1")
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows[1:]]
    assert {(c[1], c[2]) for c in cells} == {(m, n) for m in ("exact", "checkpointed", "approx", "stepwise")
                                             for n in ("1", "2")}, rows
    # exact keeps every step's graph: its saved tensors grow with n; stepwise backpropagates step by step: flat
    saved = {(c[1], c[2]): float(c[3]) for c in cells}
    assert saved["exact", "2"] > 1.5 * saved["exact", "1"]
    assert saved["stepwise", "2"] < 1.2 * saved["stepwise", "1"]
