"""python -m benchmarks.peers runs end to end (smoke mode: a tiny random UNet) when optimum-quanto is installed."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (pip install -e '.[peers]')")


def test_peers_smoke_runs_every_row_and_reports_what_each_quantizes():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if " quantizes " in line]
    assert len(rows) == 12, proc.stdout  # 4 settings x (quanto, ours at quanto's operations, ours by default)
    counts = {line.split(":")[0]: ast.literal_eval(line.split(" quantizes ", 1)[1]) for line in rows}
    quanto, matched = counts["w8a8 optimum-quanto 0.2.7"], counts["w8a8 accuquant-pl RTN, quanto's operations"]
    ours = counts["w8a8 accuquant-pl RTN, default operations"]
    assert quanto["conv_inputs"] == matched["conv_inputs"] == 0 and ours["conv_inputs"] == ours["conv_weights"] > 0
    assert quanto["linear_inputs"] == matched["linear_inputs"] == ours["linear_inputs"] > 0
    assert counts["w4a16 optimum-quanto 0.2.7"]["linear_inputs"] == 0
