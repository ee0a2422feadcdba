"""benchmarks/calibration_speed.py: its variants (the options measured against the shipped config)."""

from __future__ import annotations

import pytest

from benchmarks.calibration_speed import parse_variants


def test_variants_are_named_main_py_arguments_after_the_shipped_config():
    got = parse_variants(["kept=--model.init_args.final_stage.recompute=false --threads 1"])
    assert got == {"shipped": [], "kept": ["--model.init_args.final_stage.recompute=false", "--threads", "1"]}


@pytest.mark.parametrize("bad", ["kept", "=--x=1", "shipped=--x=1", "kept="])
def test_a_variant_without_a_new_name_or_arguments_is_refused_by_value(bad):
    with pytest.raises(SystemExit, match=f"--variant '{bad}': expected NAME=ARGS"):
        parse_variants([bad])
