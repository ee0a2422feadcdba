"""python -m benchmarks.main_comparison on the transformer teacher (--teacher dit), shrunk: every row calibrates a tiny
class-conditional DiT through main.py, evaluates it on the class-conditional protocol and lands in the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from tests.tiny_models import save_transformer_folder, tiny_dit


@pytest.mark.slow  # about a minute: two calibrations in subprocesses, the protocol set-up
def test_main_comparison_runs_the_dit_teacher(tmp_path):
    teacher = save_transformer_folder(tmp_path / "dit", tiny_dit(sample_size=16))
    shrink = {"model": {"init_args": {"iterations_per_unit": 1, "act_calibration_samples": 32,
                                      "final_stage": {"iterations": 1, "group_size": 2}}},
              "data": {"init_args": {"num_trajectories": 8, "batch_size": 8, "num_inference_steps": 6,
                                     "cache_dir": str(tmp_path / "trajectories")}}}
    (tmp_path / "shrink.yaml").write_text(yaml.safe_dump(shrink))
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "benchmarks.main_comparison", "--teacher", "dit",
                    "--teacher-path", str(teacher), "--bits", "w8a8", "--methods", "per_step,accuquant", "--seeds", "0",
                    "--eval-samples", "8", "--features", "random-projection", "--out", str(out),
                    "--work-dir", str(tmp_path / "work"), "--config-overrides", str(tmp_path / "shrink.yaml")],
                   check=True, env=env, cwd=REPO)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["bits"], r["method"], r["seed"]) for r in rows] == [("w8a8", "per_step", 0), ("w8a8", "accuquant", 0)]
    for row in rows:
        assert len(row["per_sample_mse"]) == 8 and row["mean"] > 0 and 0 <= row["label_change_share"] <= 1
    config = yaml.safe_load((tmp_path / "work" / "w8a8_accuquant_seed0" / "override.yaml").read_text())
    assert config["model"]["init_args"]["pretrained"] == str(teacher)
