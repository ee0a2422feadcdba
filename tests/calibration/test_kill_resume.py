"""A calibration killed with SIGKILL and resumed with ``--ckpt_path`` ends byte-identical to an uninterrupted run.

Every run here is a real ``python main.py fit`` subprocess: killed at a unit's checkpoint (per-step config),
inside the whole-model final stage (AccuQuant recipe, mid-epoch checkpoints) and inside a checkpoint write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from tests.calibration.test_calibration_cli import tiny_args
from tests.conftest import REPO, tiny_unet

PACE = {"class_path": "tests.calibration.kill_helpers.Pace", "init_args": {"seconds": 0.15}}
STAGE = {"final_stage": {"iterations": 6, "group_size": 2}}  # the AccuQuant recipe, shrunk


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, Path]:
    """A folder shared by this module's runs (one trajectory cache) and the tiny model they calibrate."""
    root = tmp_path_factory.mktemp("kill")
    model_dir = root / "tiny-ddpm"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(model_dir)
    return root, model_dir


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _run(args: list[str], log: Path) -> None:
    proc = _start(args, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


def _kill_when(proc: subprocess.Popen, ckpt: Path, ready: Callable[[dict[str, Any]], bool], log: Path,
               timeout: float = 300) -> dict[str, Any]:
    """SIGKILL ``proc`` as soon as ``ckpt`` holds a checkpoint for which ``ready`` is true; return that checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            if ready(state):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()  # reaped: its pid is gone, as after a real crash
                return state
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint reached the kill point in time")


def _reference(workspace, name: str, config: str, **model_args) -> Path:
    """The run folder of an uninterrupted run (computed once per module)."""
    root, model_dir = workspace
    if not (root / name / "quantized").exists():
        _run(tiny_args(root, model_dir, config, name=name, **model_args), root / f"{name}.log")
    return root / name


def _assert_same_result(a: Path, b: Path) -> None:
    """The exports under ``a`` and ``b`` (run folders) are the same bytes, and so are the RNG states their final
    checkpoints recorded (the global RNG went through the same draws, resume or not)."""
    names = sorted(p.name for p in (a / "quantized").iterdir())
    assert names == sorted(p.name for p in (b / "quantized").iterdir())
    different = [n for n in names if (a / "quantized" / n).read_bytes() != (b / "quantized" / n).read_bytes()]
    assert not different, f"resumed export differs from the uninterrupted one in {different}"
    rng_a, rng_b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["accuquant"]["rng"] for r in (a, b))
    assert torch.equal(rng_a["torch"], rng_b["torch"]) and rng_a["python"] == rng_b["python"]


def test_killed_after_a_unit_checkpoint_resumes_to_identical_files(workspace):
    root, model_dir = workspace
    reference = _reference(workspace, "qdiff_full", "digits_w4a8_qdiff.yaml")
    args = tiny_args(root, model_dir, "digits_w4a8_qdiff.yaml", name="qdiff_killed", extra_callbacks=[PACE])
    ckpt, log = root / "qdiff_killed" / "checkpoints" / "last.ckpt", root / "qdiff_killed.log"
    state = _kill_when(_start(args, log), ckpt, lambda s: len(s["accuquant"]["done_units"]) >= 3, log)
    assert state["global_step"] == 2 * len(state["accuquant"]["done_units"])  # Lightning counted every step
    assert not (root / "qdiff_killed" / "quantized").exists()
    _run([*args, "--ckpt_path", str(ckpt)], log)
    _assert_same_result(reference, root / "qdiff_killed")


def test_killed_inside_the_final_stage_resumes_to_identical_files(workspace):
    root, model_dir = workspace
    reference = _reference(workspace, "stage_full", "digits_w4a8_accuquant.yaml", **STAGE)
    args = tiny_args(root, model_dir, "digits_w4a8_accuquant.yaml", name="stage_killed", checkpoint_every=0,
                     extra_callbacks=[PACE], **STAGE)
    ckpt, log = root / "stage_killed" / "checkpoints" / "last.ckpt", root / "stage_killed.log"

    def inside_the_stage(s: dict[str, Any]) -> bool:
        mid = s["accuquant"]["mid_epoch"]
        return mid is not None and mid["epoch"] == len(s["accuquant"]["done_units"]) and mid["iteration"] >= 2

    state = _kill_when(_start(args, log), ckpt, inside_the_stage, log)
    assert not state["accuquant"]["final_stage_done"] and state["accuquant"]["mid_epoch"]["iteration"] < 6
    _run([*args, "--ckpt_path", str(ckpt)], log)
    _assert_same_result(reference, root / "stage_killed")


def test_killed_twice_inside_units_resumes_to_identical_files(workspace):
    # Checkpoints after every step, so both kills land on checkpoints written inside a unit (mid-epoch), the
    # second one in a run that was itself resumed from such a checkpoint.
    root, model_dir = workspace
    reference = _reference(workspace, "qdiff_full", "digits_w4a8_qdiff.yaml")
    args = tiny_args(root, model_dir, "digits_w4a8_qdiff.yaml", name="twice", checkpoint_every=0,
                     extra_callbacks=[PACE])
    ckpt, log = root / "twice" / "checkpoints" / "last.ckpt", root / "twice.log"

    def inside_unit(k: int) -> Callable[[dict[str, Any]], bool]:
        return lambda s: len(s["accuquant"]["done_units"]) >= k and s["accuquant"]["mid_epoch"] is not None

    first = _kill_when(_start(args, log), ckpt, inside_unit(3), log)
    second = _kill_when(_start([*args, "--ckpt_path", str(ckpt)], log), ckpt, inside_unit(6), log)
    assert first["accuquant"]["mid_epoch"]["iteration"] == second["accuquant"]["mid_epoch"]["iteration"] == 1
    _run([*args, "--ckpt_path", str(ckpt)], log)
    _assert_same_result(reference, root / "twice")


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(workspace):
    root, model_dir = workspace
    reference = _reference(workspace, "qdiff_full", "digits_w4a8_qdiff.yaml")
    marker = root / "stalled"
    stall = {"class_path": "tests.calibration.kill_helpers.StallingCheckpointIO",
             "init_args": {"stall_at": 4, "marker": str(marker)}}
    args = tiny_args(root, model_dir, "digits_w4a8_qdiff.yaml", name="write_killed", plugins=[stall])
    folder, log = root / "write_killed" / "checkpoints", root / "write_killed.log"
    proc = _start(args, log)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = list(folder.glob(".last.ckpt.*.tmp"))
    assert len(stale) == 1, "the killed save left no temp file (was it killed inside the write?)"
    # The fourth save never landed: last.ckpt is the third, complete and loadable.
    assert len(torch.load(folder / "last.ckpt", weights_only=True)["accuquant"]["done_units"]) == 3
    _run([*tiny_args(root, model_dir, "digits_w4a8_qdiff.yaml", name="write_killed"),
          "--ckpt_path", str(folder / "last.ckpt")], log)
    _assert_same_result(reference, root / "write_killed")
    assert not stale[0].exists(), "the killed write's temp file was not cleaned up by the next save"
