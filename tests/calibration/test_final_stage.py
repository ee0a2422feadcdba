"""The whole-model final stage (``final_stage``): what it trains, what it leaves, resume, bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from accuquant_pl.calibration import objectives as objectives_file
from accuquant_pl.calibration.module import FINAL_STAGE, BlockReconstruction
from accuquant_pl.cli import main
from accuquant_pl.quant import layer_biases, unit_parameters
from tests.calibration.test_calibration_cli import tiny_args


def _fit(tmp_path, model_dir, name, *extra, final_stage_iterations=0, final_stage_group_size=None, **model_args):
    stage = {"iterations": final_stage_iterations, "group_size": final_stage_group_size}
    return main([*tiny_args(tmp_path, model_dir, name=name, **model_args,
                            **({"final_stage": stage} if final_stage_iterations else {})),
                 "--data.init_args.group_size", "2", *extra])


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.student.state_dict().items()}


def test_final_stage_trains_every_step_size_and_bias_and_nothing_else(tmp_path, tiny_model_dir):
    plain = _fit(tmp_path, tiny_model_dir, "plain").model
    staged = _fit(tmp_path, tiny_model_dir, "staged", final_stage_iterations=3).model
    assert staged.epoch_names == [*staged.unit_names, FINAL_STAGE]
    assert staged.final_stage_done and not plain.final_stage_done
    assert staged.done_units == plain.done_units == plain.unit_names
    before, after = _state(plain), _state(staged)
    assert before.keys() == after.keys()
    trained = {id(p) for p in [*unit_parameters(staged.student)["act_scale"], *layer_biases(staged.student)]}
    names = {n for n, p in staged.student.named_parameters() if id(p) in trained}
    assert any(n.endswith("bias") for n in names) and any(n.endswith("scale") for n in names)
    # The units' epochs see the same batches with or without the stage: every difference is the stage's.
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == names, (f"stage left {sorted(names - changed)[:5]} untouched, "
                              f"changed {sorted(changed - names)[:5]} it must not")


def test_a_run_resumed_before_the_final_stage_ends_as_the_uninterrupted_one(tmp_path, tiny_model_dir):
    full = _fit(tmp_path, tiny_model_dir, "full", final_stage_iterations=2).model
    units = len(full.unit_names)
    _fit(tmp_path, tiny_model_dir, "resumed", "--trainer.max_epochs", str(units), final_stage_iterations=2)
    ckpt_path = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert len(ckpt["accuquant"]["done_units"]) == units and not ckpt["accuquant"]["final_stage_done"]
    resumed = _fit(tmp_path, tiny_model_dir, "resumed", "--ckpt_path", str(ckpt_path), final_stage_iterations=2)
    assert resumed.model.final_stage_done
    a = load_file(tmp_path / "full" / "quantized" / "quantized.safetensors")
    b = load_file(tmp_path / "resumed" / "quantized" / "quantized.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different[:5]}"


def test_the_final_stage_rolls_out_its_own_group_size(tmp_path, tiny_model_dir, monkeypatch):
    rolled: list[int] = []

    def recording_step(student, scheduler, batch, *args):
        rolled.append(len(batch["timesteps"][0]))
        return accuquant_step(student, scheduler, batch, *args)

    accuquant_step = objectives_file.accuquant_step
    monkeypatch.setattr(objectives_file, "accuquant_step", recording_step)
    same = _fit(tmp_path, tiny_model_dir, "same", final_stage_iterations=2).model
    assert rolled == [2, 2]  # the block_output units never call it; the stage rolls out the data's n = 2
    rolled.clear()
    longer = _fit(tmp_path, tiny_model_dir, "longer", final_stage_iterations=2, final_stage_group_size=4).model
    assert rolled == [4, 4]
    # The units saw the same batches: their rounding is the same, only the stage's parameters differ.
    a, b = _state(same), _state(longer)
    stage = {n for n, p in longer.student.named_parameters()
             if any(p is q for q in [*unit_parameters(longer.student)["act_scale"], *layer_biases(longer.student)])}
    assert {k for k in a if not torch.equal(a[k], b[k])} <= stage
    with pytest.raises(ValueError, match="final_stage.group_size 7: group_size 7 is larger than the schedule"):
        _fit(tmp_path, tiny_model_dir, "too_long", final_stage_iterations=2, final_stage_group_size=7)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"final_stage": {"group_size": 0}}, r"--model.init_args.final_stage.group_size must be >= 1, got 0"),
    ({"final_stage": {"iterations": 0}}, r"--model.init_args.final_stage.iterations must be >= 1, got 0"),
    ({"final_stage": {"gradient": "fancy"}}, r"--model.init_args.final_stage.gradient: unknown value 'fancy'"),
    ({"final_stage": {"lr_bias": 0.0}}, r"--model.init_args.final_stage.lr_bias must be > 0"),
    ({"objective": "rtn", "final_stage": {"iterations": 5}}, r"objective 'rtn' runs no optimisation.*final_stage"),
])
def test_bad_final_stage_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockReconstruction(**kwargs)
