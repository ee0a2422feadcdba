"""AdaRound: soft rounding range, initialisation, hardening, regulariser and schedule."""

from __future__ import annotations

import pytest
import torch

from accuquant_pl.quant.adaround import (
    AdaRoundQuantizer,
    AdaRoundSchedule,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
    rounding_regularizer,
)
from accuquant_pl.quant.quantizers import WeightQuantizer


def _quantizer(w: torch.Tensor, bits: int = 4, symmetric: bool = False) -> AdaRoundQuantizer:
    q = AdaRoundQuantizer(bits, symmetric, 0, tuple(w.shape))
    q.init_from_weight(w, "mse")
    return q


def test_soft_rounding_in_unit_interval():
    h = rectified_sigmoid(torch.linspace(-50, 50, 1001))
    assert h.min() == 0.0 and h.max() == 1.0 and ((h >= 0) & (h <= 1)).all()


def test_inverse_rectified_sigmoid_roundtrip():
    h = torch.rand(1000) * 0.999
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-5, rtol=0)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_init_reproduces_float_weight(symmetric):
    w = torch.randn(8, 4, 3, 3)
    q = _quantizer(w, 8, symmetric)
    s = q.scale.reshape(-1, 1, 1, 1)
    zp = q.zero_point.reshape(-1, 1, 1, 1)
    inside = (w >= (q.quant_min - zp) * s) & (w <= (q.quant_max - zp) * s)
    assert inside.float().mean() > 0.95
    err = (q(w) - w).abs()
    # soft rounding at init reproduces w (up to float error) wherever the grid does not clip it
    assert err[inside].max() < 1e-5
    assert torch.isfinite(q.alpha).all()


def test_hardened_weights_are_floor_or_ceil():
    w = torch.randn(6, 5)
    q = _quantizer(w, 4)
    with torch.no_grad():
        q.alpha.normal_(0, 3)  # arbitrary learned state
    q.harden(w)
    assert q.hardened and q.alpha is None and q.rounding.dtype == torch.uint8
    s = q.scale.reshape(-1, 1)
    zp = q.zero_point.reshape(-1, 1).float()
    k = q(w) / s  # integer grid index relative to the zero point
    lo = (torch.floor(w / s) + zp).clamp(q.quant_min, q.quant_max) - zp
    hi = (torch.ceil(w / s) + zp).clamp(q.quant_min, q.quant_max) - zp
    assert (torch.isclose(k, lo, atol=1e-5) | torch.isclose(k, hi, atol=1e-5)).all()
    assert torch.isclose(k, torch.round(k), atol=1e-5).all()


def test_harden_follows_learned_v_and_hard_mode():
    w = torch.randn(4, 16)
    q = _quantizer(w, 4)
    with torch.no_grad():
        q.alpha.normal_(0, 3)
    q.soft = False
    hard_before = q(w)
    up = (q.alpha >= 0).to(torch.uint8)
    q.harden(w, "learned")
    assert torch.equal(q.rounding, up)
    assert torch.equal(q(w), hard_before)


def test_harden_nearest_equals_rtn():
    w = torch.randn(8, 3, 3, 3)
    q = _quantizer(w, 4)
    q.harden(w, "nearest")
    rtn = WeightQuantizer(4, False, 0, 8)
    rtn.set_qparams(q.scale, q.zero_point)
    assert torch.equal(q(w), rtn(w))


def test_regularizer_goes_to_zero_as_h_binarises():
    h_soft = torch.full((100,), 0.5)
    assert rounding_regularizer(h_soft, 2.0) == pytest.approx(100.0)
    values = [rounding_regularizer(torch.full((100,), 0.5 + d), 2.0).item() for d in (0.0, 0.2, 0.4, 0.5)]
    assert values == sorted(values, reverse=True) and values[-1] == 0.0
    # a high beta (start of annealing) is nearly flat: it still penalises h = 0.9 almost fully
    assert rounding_regularizer(torch.full((10,), 0.9), 20.0) > rounding_regularizer(torch.full((10,), 0.9), 2.0)


def test_regularizer_gradient_pushes_v_away_from_half():
    w = torch.randn(4, 8)
    q = _quantizer(w, 4)
    opt = torch.optim.SGD([q.alpha], lr=1.0)
    before = q.regularizer(2.0).item()
    for _ in range(50):
        opt.zero_grad()
        q.regularizer(2.0).backward()
        opt.step()
    assert q.regularizer(2.0).item() < before * 0.5


def test_schedule_values():
    sched = AdaRoundSchedule(total_iters=100)
    assert sched(0) == (20.0, 0.0)
    assert sched(19) == (20.0, 0.0)
    assert sched(20) == (20.0, 0.01)
    beta_mid, w_mid = sched(60)
    assert beta_mid == pytest.approx(11.0) and w_mid == 0.01
    assert sched(100) == (2.0, 0.01)
    betas = [sched(i)[0] for i in range(20, 101)]
    assert betas == sorted(betas, reverse=True)


def test_hard_mode_at_init_is_round_to_nearest():
    w = torch.randn(5, 7)
    q = _quantizer(w, 3)
    q.soft = False  # hard rounding, h(V) >= 0.5
    rtn = WeightQuantizer(3, False, 0, 5)
    rtn.set_qparams(q.scale, q.zero_point)
    assert torch.equal(q(w), rtn(w))
