"""``fit --ckpt_path``: a file that is not a calibration checkpoint, or a resume under other settings, is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from accuquant_pl.calibration.checkpoint import CheckpointError
from accuquant_pl.cli import main
from accuquant_pl.quant import QuantSpec
from tests.calibration.test_calibration_cli import tiny_args
from tests.conftest import REPO, tiny_unet


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny W4A8 AccuQuant run stopped after its first unit: (tmp folder, model folder, last.ckpt)."""
    root = tmp_path_factory.mktemp("resume")
    model_dir = root / "tiny-ddpm"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(model_dir)
    main([*tiny_args(root, model_dir, name="first"), "--trainer.max_epochs", "1"])
    return root, model_dir, root / "first" / "checkpoints" / "last.ckpt"


def _resume(calibrated, *extra: str):
    root, model_dir, ckpt = calibrated
    return main([*tiny_args(root, model_dir, name="resumed"), "--ckpt_path", str(ckpt), *extra])


@pytest.mark.parametrize(("args", "difference"), [
    (["--model.init_args.quant.weight_bits", "8"], "model.init_args.quant.weight_bits: 4 -> 8"),
    (["--model.init_args.objective", "per_step"], "model.init_args.objective: 'accuquant' -> 'per_step'"),
    (["--data.init_args.group_size", "2"], "data.init_args.group_size: 1 -> 2"),
    (["--model.init_args.pretrained", "models/digits-ddpm"], "model.init_args.pretrained: '"),
    (["--trainer.precision", "bf16-mixed"], "trainer.precision: '32-true' -> 'bf16-mixed'"),
    (["--threads", "2"], "threads: 1 -> 2"),  # the suite runs on one thread (conftest)
])
def test_a_resume_under_other_settings_names_them_before_any_work(calibrated, args, difference):
    with pytest.raises(CheckpointError, match="other settings") as err:
        _resume(calibrated, *args)
    assert difference in str(err.value)
    assert "--use_checkpoint_config true" in str(err.value)
    root = calibrated[0]
    assert not (root / "resumed" / "checkpoints").exists(), "work started before the settings were compared"


def test_settings_that_cannot_change_the_result_may_differ(calibrated):
    cli = _resume(calibrated, "--data.init_args.rebuild", "true", "--trainer.log_every_n_steps", "1",
                  "--trainer.max_epochs", "2")
    assert len(cli.model.done_units) == 2


def test_use_checkpoint_config_resumes_with_the_checkpoints_settings(calibrated):
    cli = _resume(calibrated, "--model.init_args.quant.weight_bits", "8", "--data.init_args.group_size", "2",
                  "--threads", "2", "--use_checkpoint_config", "true", "--trainer.max_epochs", "2")
    assert cli.model.spec.weight_bits == 4 and cli.datamodule.hparams.group_size == 1
    assert torch.get_num_threads() == 1 and cli.config.fit.threads == 1
    assert len(cli.model.done_units) == 2


def _not_checkpoints(tmp_path) -> dict[str, str]:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                      .numpy().tobytes())
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "hyper_parameters": {"quant": QuantSpec()}}, pickled)
    foreign = tmp_path / "pretraining.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "hyper_parameters": {"_class_path": "some.Pretraining"}}, foreign)
    return {str(text): "not a checkpoint", str(noise): "not a checkpoint", str(plain): "without Lightning's",
            str(foreign): "written by some.Pretraining, not by a BlockReconstruction calibration",
            str(pickled): "holds a pickled accuquant_pl.quant.spec.QuantSpec, which a safe load",
            str(tmp_path / "missing.ckpt"): "does not exist", str(tmp_path): "is a folder"}


def test_a_path_that_is_not_a_calibration_checkpoint_is_named(calibrated, tmp_path):
    root, model_dir, ckpt = calibrated
    data = ckpt.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    cases = {**_not_checkpoints(tmp_path), str(truncated): "truncated, or another kind of file"}
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match="--ckpt_path") as err:
            main([*tiny_args(root, model_dir, name="bad"), "--ckpt_path", path])
        assert path in str(err.value) and message in str(err.value), str(err.value)


def test_the_command_line_prints_one_line_not_a_traceback(tmp_path):
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(256)) * 8)
    proc = subprocess.run([sys.executable, "main.py", "fit", "--config", "configs/digits_w4a8_qdiff.yaml",
                           "--ckpt_path", str(noise)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --ckpt_path '{noise}' is not a checkpoint"), proc.stderr[-2000:]


def test_a_checkpoint_from_before_timestep_groups_resumes_and_evaluates_as_one_range(calibrated, tmp_path):
    """Its spec has neither timestep key and its step sizes one range each: the default 4 groups are named as the
    difference, ``act_timestep_groups: 1`` resumes it, and evaluation rebuilds it with one range."""
    from accuquant_pl.calibration import BlockReconstruction

    root, model_dir, ckpt = calibrated
    one_range = root / "one_range"
    main([*tiny_args(root, model_dir, name="one_range"), "--trainer.max_epochs", "1",
          "--model.init_args.quant.act_timestep_groups", "1"])
    legacy = torch.load(one_range / "checkpoints" / "last.ckpt", weights_only=False)
    for key in ("act_timestep_groups", "act_timestep_boundaries"):
        del legacy["hyper_parameters"]["quant"][key]
    path = tmp_path / "legacy.ckpt"
    torch.save(legacy, path)
    with pytest.raises(CheckpointError, match=r"quant\.act_timestep_boundaries: \[\] -> '4 equal groups"):
        main([*tiny_args(root, model_dir, name="legacy_default"), "--ckpt_path", str(path)])
    cli = main([*tiny_args(root, model_dir, name="legacy"), "--ckpt_path", str(path), "--trainer.max_epochs", "2",
                "--model.init_args.quant.act_timestep_groups", "1"])
    assert len(cli.model.done_units) == 2
    student = BlockReconstruction.student_from_checkpoint(legacy)
    assert student.conv_in.input_quantizer.num_groups == 1


def test_a_checkpoint_of_an_old_class_path_compares_equal_to_the_package_export():
    from accuquant_pl.calibration.checkpoint import settings_differences

    checkpoint = {"hyper_parameters": {"_class_path": "accuquant_pl.calibration.module.BlockReconstruction",
                                       "objective": "rtn"}}
    model = {"class_path": "accuquant_pl.calibration.BlockReconstruction", "init_args": {"objective": "rtn"}}
    assert settings_differences(checkpoint, model, None) == []
    other = {"class_path": "accuquant_pl.evaluation.SampleEvaluation", "init_args": {"objective": "rtn"}}
    assert any(d.startswith("model.class_path") for d in settings_differences(checkpoint, other, None))


def test_a_checkpoint_of_an_earlier_signature_is_refused_by_name(tiny_model_dir):
    from accuquant_pl.calibration import BlockReconstruction

    checkpoint = {"accuquant": {}, "state_dict": {}, "hyper_parameters": {
        "pretrained": str(tiny_model_dir), "objective": "per_step", "final_stage_iterations": 0}}
    with pytest.raises(ValueError, match="final_stage_iterations.*written by an earlier version"):
        BlockReconstruction.student_from_checkpoint(checkpoint)


def test_a_checkpoint_from_before_the_rename_of_the_fp_model_keys_compares_and_resumes_equal(monkeypatch):
    # Written before the second layout pass: the data module's FP model was ``teacher``, the section's
    # ``source_model``. Same settings under their new names are no difference; the Hub check still reads the old key.
    from accuquant_pl.calibration import checkpoint as ckpt

    saved = {"hyper_parameters": {"_class_path": "accuquant_pl.calibration.BlockReconstruction", "objective": "rtn"},
             "datamodule_hyper_parameters": {"_class_path": "accuquant_pl.data.TrajectoryDataModule",
                                             "teacher": "models/digits-ddpm", "group_size": 2},
             "accuquant": {"source_model": "acme/tiny@aaaa"}}
    model = {"class_path": "accuquant_pl.calibration.BlockReconstruction", "init_args": {"objective": "rtn"}}
    data = {"class_path": "accuquant_pl.data.TrajectoryDataModule",
            "init_args": {"pretrained": "models/digits-ddpm", "group_size": 2}}
    assert ckpt.settings_differences(saved, model, data) == []
    assert ckpt.checkpoint_data_config(saved, data)["init_args"] == {"pretrained": "models/digits-ddpm",
                                                                       "group_size": 2}
    monkeypatch.setattr(ckpt, "hub_reference", lambda pretrained: pretrained)
    with pytest.raises(ValueError, match="calibrated from 'acme/tiny@aaaa'.*now resolves to 'acme/tiny@bbbb'"):
        ckpt.saved_progress(saved, "accuquant", "acme/tiny", "acme/tiny@bbbb")


def test_recompute_is_no_difference_on_resume_but_the_stage_iterations_are():
    # Keeping or recomputing the approx step graphs gives the same gradient bit for bit (tests/calibration/
    # test_rollout.py), so a checkpoint written before the option existed, or under the other value, resumes.
    from accuquant_pl.calibration import checkpoint as ckpt

    stage = {"iterations": 200, "gradient": "approx", "group_size": 8, "lr_bias": 1e-4}
    saved = {"hyper_parameters": {"_class_path": "accuquant_pl.calibration.BlockReconstruction",
                                  "objective": "accuquant", "final_stage": stage}}

    def model(**changes):
        return {"class_path": "accuquant_pl.calibration.BlockReconstruction",
                "init_args": {"objective": "accuquant", "final_stage": {**stage, **changes}}}

    assert ckpt.settings_differences(saved, model(recompute=False), None) == []
    assert ckpt.settings_differences(saved, model(recompute=True), None) == []
    assert ckpt.settings_differences(saved, model(iterations=100), None) == [
        "model.init_args.final_stage.iterations: 200 -> 100"]
