"""UnitProgressBar: names the epoch's unit and counts to that epoch's own iterations."""

from __future__ import annotations

import lightning as L

from accuquant_pl.calibration import FinalStage
from accuquant_pl.calibration.module import FINAL_STAGE, BlockReconstruction
from accuquant_pl.data.trajectories import TrajectoryDataModule
from callbacks.unit_progress import UnitProgressBar


class BarRecorder(L.Callback):
    """Reads the progress bar after it has set up the epoch and after the epoch's last step."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.desc.rstrip(": "), bar.total, bar.n))  # tqdm appends ": " to a description


def test_bar_names_each_unit_and_counts_its_iterations(tmp_path, tiny_model_dir):
    module = BlockReconstruction(pretrained=str(tiny_model_dir), iterations_per_unit=2, final_stage=FinalStage(iterations=3),
                                 act_calibration_samples=8)
    data = TrajectoryDataModule(pretrained=str(tiny_model_dir), num_inference_steps=6, num_trajectories=4,
                                batch_size=4, group_size=2, cache_dir=str(tmp_path / "cache"))
    recorder = BarRecorder()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[UnitProgressBar(), recorder], default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    names = module.epoch_names
    assert names[-1] == FINAL_STAGE
    assert [desc for desc, _, _ in recorder.seen] == [f"unit {i + 1}/{len(names)} {n}" for i, n in enumerate(names)]
    # The loader yields the stage's 3 batches every epoch; a unit's bar still ends full at its 2.
    assert [(total, n) for _, total, n in recorder.seen] == [(2, 2)] * (len(names) - 1) + [(3, 3)]
