"""The README's plain-Lightning example, run with tiny settings: the pieces work outside main.py."""

from pathlib import Path

import lightning as L
import torch

from accuquant_pl.calibration import BlockReconstruction
from accuquant_pl.data import TrajectoryDataModule
from accuquant_pl.deploy import load_quantized
from accuquant_pl.quant import QuantSpec
from callbacks import CalibrationCheckpoint, ExportQuantized
from tests.conftest import REPO


def test_readme_example_with_a_plain_trainer(tmp_path, tiny_model_dir):
    data = TrajectoryDataModule(pretrained=str(tiny_model_dir), num_inference_steps=5, num_trajectories=4,
                                batch_size=4, group_size=2, cache_dir=str(tmp_path / "cache"))
    model = BlockReconstruction(pretrained=str(tiny_model_dir), quant=QuantSpec(weight_bits=4, act_bits=8, adaround=True),
                                objective="accuquant", iterations_per_unit=2, lr_adaround=1e-2,
                                act_calibration_samples=8)
    trainer = L.Trainer(accelerator="cpu", callbacks=[CalibrationCheckpoint(str(tmp_path / "ckpt")),
                                                       ExportQuantized(str(tmp_path / "q"))],
                        logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert trainer.current_epoch == len(model.unit_names) == len(model.done_units)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["accuquant"]["done_units"] == model.unit_names
    unet = load_quantized(tmp_path / "q")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(unet(x, 3).sample, model.student(x, 3).sample)


def test_the_readme_example_imports_what_this_test_imports():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Use the pieces in your own Lightning script", 1)[1].split("```python", 1)[1].split("```")[0]
    ours = Path(__file__).read_text()
    imports = [line for line in block.splitlines() if line.startswith(("from ", "import "))]
    assert imports and all(line in ours for line in imports), imports
