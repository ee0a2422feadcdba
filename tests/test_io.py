"""Atomic writes under real kills: the swap window of a folder replacement, and temp files of killed writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import accuquant_pl
from accuquant_pl.deploy.artifact import export_quantized
from accuquant_pl.io import atomic_directory, atomic_path, recover_directory, remove_stale_temps
from accuquant_pl.quant import QuantSpec, calibrate_activations, quantize
from tests.conftest import REPO, tiny_unet
from tests.quant.quant_helpers import unet_batches

KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from accuquant_pl.io import atomic_directory
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".old"):  # the old folder is out of the way, the new one not yet in: die here
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    with atomic_directory(sys.argv[1]) as tmp:
        (tmp / "new.txt").write_text("the replacement")
""")

KILLED_INSIDE_A_WRITE = textwrap.dedent("""
    import os, signal, sys
    from accuquant_pl.io import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _run_killed(script: str, target: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", script, str(target)], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]


def _quantized_model():
    torch.manual_seed(0)
    model = quantize(tiny_unet(), QuantSpec(weight_bits=8, act_bits=8))
    calibrate_activations(model, unet_batches(2, 2))
    return model.eval()


def test_an_export_killed_between_its_two_renames_still_loads_and_is_restored_by_the_next_export(tmp_path):
    model = _quantized_model()
    folder = export_quantized(model, tmp_path / "q", scheduler_config={"_class_name": "DDPMScheduler"})
    _run_killed(KILLED_BETWEEN_RENAMES, folder)
    assert not folder.exists() and (tmp_path / ".q.old").is_dir()  # the window the issue found
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        # A reader reads the old folder where it is (it never renames: a writer may be between its renames)...
        assert torch.equal(accuquant_pl.load_quantized(folder)(x, 4).sample, model(x, 4).sample)
    assert not folder.exists()
    # ... and the next export puts the folder back in place before replacing it.
    export_quantized(model, folder, scheduler_config={"_class_name": "DDPMScheduler"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    with torch.no_grad():
        assert torch.equal(accuquant_pl.load_quantized(folder)(x, 4).sample, model(x, 4).sample)


def test_the_next_write_restores_the_folder_and_removes_the_killed_writes_temp_folder(tmp_path):
    target = tmp_path / "cache"
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("the original")
    _run_killed(KILLED_BETWEEN_RENAMES, target)
    assert not target.exists()
    assert recover_directory(target) is True and (target / "old.txt").read_text() == "the original"
    _run_killed(KILLED_BETWEEN_RENAMES, target)
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].is_dir()  # the killed write's complete replacement folder
    with atomic_directory(target) as tmp:
        (tmp / "third.txt").write_text("third")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no .old, no temp folders
    assert [p.name for p in target.iterdir()] == ["third.txt"]


def test_a_stale_swap_folder_beside_a_complete_one_is_removed(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / ".q.old").mkdir()
    assert recover_directory(tmp_path / "q") is False
    assert not (tmp_path / ".q.old").exists() and (tmp_path / "q").is_dir()


HOLDS_A_TEMP_FILE = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what atomic_path's writer holds while it writes
    print("locked", flush=True)
    time.sleep(120)
""")


def test_temp_files_of_killed_writes_are_cleaned_by_the_next_write_and_live_ones_kept(tmp_path):
    target = tmp_path / "last.ckpt"
    _run_killed(KILLED_INSIDE_A_WRITE, target)
    first = sorted(tmp_path.glob(".last.ckpt.*.tmp"))
    _run_killed(KILLED_INSIDE_A_WRITE, target)  # its start removes the first killed write's temp file
    stale = sorted(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(first) == 1 and len(stale) == 1 and stale != first and not target.exists()
    # A writer that is still running keeps its temp file: it holds the file's lock.
    live_temp = tmp_path / ".last.ckpt.live.tmp"
    live = subprocess.Popen([sys.executable, "-c", HOLDS_A_TEMP_FILE, str(live_temp)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert live.stdout.readline().strip() == "locked"
        with atomic_path(target) as tmp:
            tmp.write_text("complete")
        assert target.read_text() == "complete"
        assert not any(p.exists() for p in stale) and live_temp.exists()
        assert remove_stale_temps(target) == []
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temps(target) == [live_temp] and not live_temp.exists()
