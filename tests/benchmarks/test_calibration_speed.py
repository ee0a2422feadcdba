"""benchmarks/calibration_speed.py: its variants (the options measured against the shipped config)."""

from __future__ import annotations

import pytest

from benchmarks.calibration_speed import parse_variants, projected_training_s


def test_variants_are_named_main_py_arguments_after_the_shipped_config():
    got = parse_variants(["kept=--model.init_args.final_stage.recompute=false --threads 1"])
    assert got == {"shipped": [], "kept": ["--model.init_args.final_stage.recompute=false", "--threads", "1"]}


@pytest.mark.parametrize("bad", ["kept", "=--x=1", "shipped=--x=1", "kept="])
def test_a_variant_without_a_new_name_or_arguments_is_refused_by_value(bad):
    with pytest.raises(SystemExit, match=f"--variant '{bad}': expected NAME=ARGS"):
        parse_variants([bad])


def test_the_projection_uses_the_configs_own_iterations():
    row = {"units": 22, "s_per_unit_iter": 0.05, "s_per_stage_step": 1.5}
    # configs/digits_w4a8_accuquant.yaml: 50 iterations per unit, 200 final-stage steps
    assert projected_training_s("configs/digits_w4a8_accuquant.yaml", row) == 22 * 50 * 0.05 + 200 * 1.5
    # configs/digits_w4a8_qdiff.yaml: 50 iterations per unit, no final stage
    assert projected_training_s("configs/digits_w4a8_qdiff.yaml", row) == pytest.approx(22 * 50 * 0.05)
