"""Exported transformer denoisers (DiT, PixArt): packed integer weights load back bit-identical to the calibrated
fake-quant model, called the way their pipelines call them (keywords, per-sample timesteps)."""

from __future__ import annotations

import pytest
import torch

from accuquant_pl.deploy import export_quantized, load_quantized
from accuquant_pl.quant import QuantSpec, calibrate_activations, harden, quantize, quantized_layers
from tests.quant.test_quant_transformers import dit_batches, pixart_batches
from tests.tiny_models import tiny_dit, tiny_pixart

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


@pytest.mark.parametrize("make, batches, cond", [
    (lambda: tiny_dit(learned_sigma=True), dit_batches, "class_labels"),
    (tiny_pixart, pixart_batches, "encoder_hidden_states"),
])
def test_exported_transformer_equals_the_fake_quantized_model(tmp_path, make, batches, cond):
    torch.manual_seed(0)
    model = quantize(make(), QuantSpec(weight_bits=4, act_bits=8, adaround=True))
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.weight_quantizer.alpha.normal_(0, 2)
    calibrate_activations(model, batches(model))
    harden(model)
    model.eval()
    folder = export_quantized(model, tmp_path / "q", scheduler_config=SCHEDULER)
    loaded = load_quantized(folder)
    assert type(loaded) is type(model)
    b = batches(model, 1)[0]
    with torch.no_grad():
        want = model(hidden_states=b["sample"], timestep=b["timestep"], **{cond: b[cond]}).sample
        got = loaded(hidden_states=b["sample"], timestep=b["timestep"], **{cond: b[cond]}).sample
    assert torch.equal(got, want)
    assert want.shape[1] == 2 * b["sample"].shape[1]  # learned sigma: eps and variance
