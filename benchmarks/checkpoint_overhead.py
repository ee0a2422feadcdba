"""What a kill can lose and what checkpoints cost, on a calibration config (default: the README's main job).

Runs ``fit`` on the config with its own CalibrationCheckpoint replaced by a timed one (same interval) in a
temporary folder, no logger, no FID or export callbacks, and prints:

* the wall time of every epoch (unit, or the final stage) and of the final stage's steps;
* every checkpoint's save time (state dump + atomic write) and size;
* the most a kill can lose: the longest stretch of training between two checkpoints (or from the start).

    OMP_NUM_THREADS=1 python -m benchmarks.checkpoint_overhead [--config configs/digits_w4a8_accuquant.yaml]
        [--every-n-seconds 60] [-- extra fit arguments]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from accuquant_pl.cli import main
from benchmarks.common import REPO
from callbacks.checkpoint import CalibrationCheckpoint


class TimedCheckpoint(CalibrationCheckpoint):
    """CalibrationCheckpoint that records when each save started and ended, and the file's size."""

    def __init__(self, dirpath: str, every_n_seconds: float | None) -> None:
        super().__init__(dirpath=dirpath, every_n_seconds=every_n_seconds)
        self.saves: list[tuple[float, float, int]] = []  # (start, end, bytes)

    def _save_now(self, trainer: L.Trainer) -> None:
        before = self._last_global_step_saved
        start = time.monotonic()
        super()._save_now(trainer)
        if self._last_global_step_saved != before:
            self.saves.append((start, time.monotonic(), Path(self.last_model_path).stat().st_size))


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.start = 0.0
        self.epochs: list[tuple[str, float, float]] = []  # (name, start, end)
        self._epoch_start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = getattr(pl_module, "epoch_names", [])
        name = names[trainer.current_epoch] if trainer.current_epoch < len(names) else str(trainer.current_epoch)
        self.epochs.append((name, self._epoch_start, time.monotonic()))


def run(config: str, every_n_seconds: float | None, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cli = main(["--config", config, "--trainer.logger", "false",
                    "--trainer.default_root_dir", tmp, *extra], run=False)
        checkpoint, timer = TimedCheckpoint(str(Path(tmp) / "checkpoints"), every_n_seconds), EpochTimer()
        # The config's own checkpoint, export and evaluation callbacks are left out: this measures calibration.
        kept = [c for c in cli.trainer.callbacks
                if not isinstance(c, Checkpoint) and type(c).__module__.split(".")[0] != "callbacks"]
        cli.trainer.callbacks[:] = [*kept, checkpoint, timer]
        cli.trainer.fit(cli.model, cli.datamodule)
        end = time.monotonic()
    print(f"config: {config}  every_n_seconds: {every_n_seconds}")
    print(f"training wall time: {end - timer.start:.1f} s over {len(timer.epochs)} epochs")
    durations = [(name, e - s) for name, s, e in timer.epochs]
    units = [d for name, d in durations if name != "final_stage"]
    print(f"unit time: mean {statistics.mean(units):.2f} s, max {max(units):.2f} s "
          f"({max(durations, key=lambda x: x[1] if x[0] != 'final_stage' else 0)[0]})")
    stage = [d for name, d in durations if name == "final_stage"]
    if stage:
        iters = cli.model.settings.final_stage_iterations
        print(f"final stage: {stage[0]:.1f} s, {stage[0] / iters:.2f} s per step ({iters} steps)")
    seconds = [e - s for s, e, _ in checkpoint.saves]
    sizes = [b / 2**20 for _, _, b in checkpoint.saves]
    print(f"checkpoints: {len(seconds)}, save time mean {statistics.mean(seconds):.3f} s, max {max(seconds):.3f} s, "
          f"total {sum(seconds):.1f} s ({100 * sum(seconds) / (end - timer.start):.1f} % of training)")
    print(f"checkpoint size: mean {statistics.mean(sizes):.2f} MB, max {max(sizes):.2f} MB")
    marks = [timer.start] + [e for _, e, _ in checkpoint.saves]
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    print(f"most a kill can lose (longest training stretch between checkpoints): {max(gaps):.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "digits_w4a8_accuquant.yaml"))
    parser.add_argument("--every-n-seconds", type=float, default=60.0)
    parser.add_argument("extra", nargs="*", help="further fit arguments (after --)")
    args = parser.parse_args()
    run(args.config, args.every_n_seconds, args.extra)
