"""Typed settings of BlockReconstruction: each group validates itself, naming its --model.init_args key, and an
option the chosen objective does not use is an error instead of being ignored."""

from __future__ import annotations

import pytest
import yaml

from accuquant_pl.calibration import Ablations, BlockReconstruction, FinalStage, Rounding
from accuquant_pl.cli import main
from tests.conftest import REPO


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"objective": "per_step", "gradient": "checkpointed"}, r"--model.init_args.gradient is an option of objective"),
    ({"objective": "per_step", "rollout_target": "state"}, r"--model.init_args.rollout_target is an option"),
    ({"objective": "rtn", "iterations_per_unit": 50}, r"objective 'rtn'.*--model.init_args.iterations_per_unit"),
    ({"objective": "rtn", "lr_adaround": 0.01}, r"objective 'rtn'.*--model.init_args.lr_adaround"),
    ({"objective": "rtn", "ablations": Ablations()}, r"objective 'rtn'.*ablations"),
    ({"objective": "fancy"}, r"--model.init_args.objective: unknown value 'fancy'"),
    ({"iterations_per_unit": 0}, r"--model.init_args.iterations_per_unit must be >= 1, got 0"),
    ({"act_calibration_samples": 0}, r"--model.init_args.act_calibration_samples must be >= 1"),
    ({"lr_act_scale": -1.0}, r"--model.init_args.lr_act_scale must be > 0"),
])
def test_an_option_the_objective_does_not_use_or_a_bad_value_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockReconstruction(**kwargs)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Rounding(warmup=1.5), r"--model.init_args.rounding.warmup must be in \[0, 1\), got 1.5"),
    (lambda: Rounding(beta_start=1.0, beta_end=2.0), r"--model.init_args.rounding: need beta_start >= beta_end"),
    (lambda: Ablations(later_units="some"), r"--model.init_args.ablations.later_units: unknown value 'some'"),
    (lambda: Ablations(loss_reduction="max"), r"--model.init_args.ablations.loss_reduction: unknown value"),
    (lambda: FinalStage(iterations=0), r"--model.init_args.final_stage.iterations must be >= 1"),
    (lambda: FinalStage(gradient="stepwise", recompute=False),
     r"--model.init_args.final_stage.recompute=False keeps the step graphs of gradient 'approx'; "
     r"final_stage.gradient 'stepwise'"),
])
def test_each_group_validates_itself(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_groups_reach_the_settings_and_the_checkpoint_as_plain_data():
    module = BlockReconstruction(objective="per_step", iterations_per_unit=7, rounding={"weight": 0.1},
                                 final_stage=FinalStage(iterations=5, group_size=4),
                                 ablations={"later_units": "quantized"})
    st = module.settings
    assert (st.iterations_per_unit, st.rounding.weight, st.final_stage.group_size, st.ablations.later_units) == (
        7, 0.1, 4, "quantized")
    assert st.rollout_target is None and st.gradient is None  # per-step has no rollout
    assert module.hparams["final_stage"] == {"iterations": 5, "gradient": "approx", "recompute": True,
                                             "group_size": 4, "lr_bias": 1e-4}
    assert module.hparams["rounding"]["weight"] == 0.1 and module.hparams["ablations"]["later_units"] == "quantized"
    assert BlockReconstruction(objective="rtn").settings.iterations_per_unit == 0


def test_shipped_configs_set_no_option_their_objective_ignores_and_print_nested_groups(capsys):
    checked = 0
    for path in sorted((REPO / "configs").glob("*.yaml")):
        model = yaml.safe_load(path.read_text()).get("model") or {}
        if model.get("class_path") == "accuquant_pl.calibration.BlockReconstruction":
            BlockReconstruction(**model["init_args"])  # raises on an option its objective does not use
            checked += 1
    assert checked >= 12
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "digits_w4a8_accuquant.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert printed["final_stage"] == {"iterations": 200, "gradient": "approx", "recompute": False, "group_size": 8,
                                      "lr_bias": 0.0001}


def test_model_help_lists_the_groups_with_their_types(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "accuquant_pl.calibration.BlockReconstruction"])
    text = " ".join(capsys.readouterr().out.split())
    for group in ("Rounding", "FinalStage", "Ablations"):
        assert f"{group} | null" in text
    assert "research variants" in text and "None: no stage" in text
