"""Fake-quantization maths against torch's reference kernels, STE/LSQ gradients, initialisers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from accuquant_pl.quant.affine import FakeQuantizeLSQ, fake_quantize, quant_range
from accuquant_pl.quant.layers import QuantLinear
from accuquant_pl.quant.quantizers import ActivationQuantizer, WeightQuantizer
from accuquant_pl.quant.range_init import (
    channel_rows,
    init_minmax,
    init_mse,
    init_percentile,
    minmax_qparams,
)

BITS = [2, 3, 4, 5, 6, 7, 8]


def quant_error(rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool,
                norm: float = 2.0) -> torch.Tensor:
    """Mean ``|x - Q(x)|^norm`` of each column of ``rows [N, C]`` -> ``[C]``."""
    qmin, qmax = quant_range(bits, symmetric)
    with torch.no_grad():
        err = fake_quantize(rows, scale, zero_point, qmin, qmax, axis=-1) - rows
    return err.abs().pow(norm).mean(dim=0)


@pytest.mark.parametrize("bits,symmetric,expected", [(8, False, (0, 255)), (8, True, (-128, 127)),
                                                     (4, False, (0, 15)), (2, True, (-2, 1))])
def test_quant_range(bits, symmetric, expected):
    assert quant_range(bits, symmetric) == expected


@pytest.mark.parametrize("bad", [0, 1, 9, 15, 32])
def test_quant_range_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match=str(bad)):
        quant_range(bad, False)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), symmetric=st.booleans(), ndim=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_per_tensor_matches_torch(bits, symmetric, ndim, seed):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(torch.randint(1, 6, (ndim,), generator=g).tolist())
    x = torch.randn(shape, generator=g) * 3
    qmin, qmax = quant_range(bits, symmetric)
    scale = torch.rand((), generator=g) * 0.5 + 0.01
    zp = torch.tensor(0 if symmetric else int(torch.randint(qmin, qmax + 1, (), generator=g)), dtype=torch.int32)
    ref = torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zp.reshape(1), qmin, qmax)
    torch.testing.assert_close(fake_quantize(x, scale, zp, qmin, qmax), ref, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), symmetric=st.booleans(), ndim=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_per_channel_matches_torch_any_axis(bits, symmetric, ndim, seed):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(torch.randint(1, 6, (ndim,), generator=g).tolist())
    axis = int(torch.randint(0, ndim, (), generator=g))
    x = torch.randn(shape, generator=g) * 3
    qmin, qmax = quant_range(bits, symmetric)
    scale = torch.rand(shape[axis], generator=g) * 0.5 + 0.01
    zp = torch.zeros(shape[axis], dtype=torch.int32) if symmetric else \
        torch.randint(qmin, qmax + 1, (shape[axis],), generator=g, dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    torch.testing.assert_close(fake_quantize(x, scale, zp, qmin, qmax, axis=axis), ref, rtol=0, atol=0)


def test_rounding_ties_and_clamping_edges():
    scale, zp = torch.tensor(0.5), torch.tensor(2, dtype=torch.int32)
    qmin, qmax = quant_range(3, False)  # 0..7 -> representable [-1.0, 2.5]
    x = torch.tensor([-100.0, -1.0, -0.25, 0.25, 0.75, 2.5, 2.75, 100.0])
    out = fake_quantize(x, scale, zp, qmin, qmax)
    # ties (-0.25 -> -0.5 / 0, 0.25 -> 0/0.5) round half to even on the integer grid, like torch
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, 0.0, 0.0, 1.0, 2.5, 2.5, 2.5]), rtol=0, atol=0)
    ref = torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zp.reshape(1), qmin, qmax)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_ste_gradient_passes_inside_and_blocks_outside():
    qmin, qmax = quant_range(4, False)
    scale, zp = torch.tensor(0.1), torch.tensor(3, dtype=torch.int32)
    x = torch.linspace(-2, 2, 101, requires_grad=True)
    fake_quantize(x, scale, zp, qmin, qmax).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(x_ref, scale.reshape(1), zp.reshape(1), qmin, qmax).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert set(x.grad.tolist()) == {0.0, 1.0}
    assert x.grad[50] == 1.0 and x.grad[0] == 0.0 and x.grad[-1] == 0.0


def test_lsq_scale_gradient_finite_and_nonzero():
    q = ActivationQuantizer(bits=4)
    x = torch.randn(2, 3, 5, 5)
    q.calibrate(x, "minmax")
    q(x * 1.5).pow(2).sum().backward()  # * 1.5 so some values are clipped
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all() and q.scale.grad.abs() > 0


def test_lsq_gradient_scale_factor():
    """The step size gradient equals the raw LSQ gradient times 1/sqrt(N * Qp), N = features per sample."""
    q = ActivationQuantizer(bits=4)
    x = torch.randn(4, 8)
    q.calibrate(x, "minmax")
    q(x).sum().backward()
    s = q.scale.detach().clone().requires_grad_(True)
    fake_quantize(x, s, q.zero_point, q.quant_min, q.quant_max).sum().backward()
    torch.testing.assert_close(q.scale.grad, s.grad / (x.shape[1] * q.quant_max) ** 0.5)


def test_minmax_covers_range_and_zero_point_integer():
    x = torch.tensor([[-1.0, 0.5], [3.0, 2.0]])
    scale, zp = init_minmax(x, 8, False)
    assert zp.dtype == torch.int32
    qmin, qmax = quant_range(8, False)
    out = fake_quantize(x, scale, zp, qmin, qmax, axis=-1)
    # min/max map onto grid points up to half a step; nothing in range is clipped
    assert ((out - x).abs() <= scale / 2 + 1e-6).all()
    # a range that excludes 0 is widened to include it (zero exactly representable)
    s2, z2 = minmax_qparams(torch.tensor([1.0]), torch.tensor([2.0]), 8, False)
    assert z2.item() == 0 and fake_quantize(torch.zeros(1), s2, z2, qmin, qmax).item() == 0.0


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_not_worse_than_minmax(bits, symmetric):
    rows = torch.randn(512, 6) * torch.tensor([0.1, 1, 3, 10, 0.5, 2])
    rows[0] *= 20  # outliers make clipping worthwhile
    mm = quant_error(rows, *init_minmax(rows, bits, symmetric), bits, symmetric)
    mse = quant_error(rows, *init_mse(rows, bits, symmetric), bits, symmetric)
    assert (mse <= mm).all()
    if bits <= 4:
        assert (mse < mm).any()


def _mse_reference(x: torch.Tensor, bits: int, symmetric: bool, grid: int = 80) -> tuple[float, int]:
    """Plain python search for one channel (the reference the vectorised search must match)."""
    qmin, qmax = quant_range(bits, symmetric)
    best = None
    for ratio in torch.linspace(1.0, 0.2, grid).tolist():
        s, z = minmax_qparams(x.min() * ratio, x.max() * ratio, bits, symmetric)
        err = (fake_quantize(x, s, z, qmin, qmax) - x).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, s.item(), int(z))
    return best[1], best[2]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [3, 8])
def test_mse_vectorised_equals_per_channel_loop(bits, symmetric, monkeypatch):
    w = torch.randn(7, 3, 3, 3) * torch.rand(7, 1, 1, 1) * 4
    w[2, 0, 0, 0] = 30.0  # an outlier channel where clipping wins
    rows = channel_rows(w, 0)
    scale, zp = init_mse(rows, bits, symmetric)
    # a tiny chunk forces several grid chunks: the chunked search must agree with the single pass
    monkeypatch.setattr("accuquant_pl.quant.range_init._MSE_CHUNK_ELEMS", rows.numel() * 3)
    scale_chunked, zp_chunked = init_mse(rows, bits, symmetric)
    assert torch.equal(scale, scale_chunked) and torch.equal(zp, zp_chunked)
    for c in range(7):
        s_c, z_c = _mse_reference(w[c].flatten(), bits, symmetric)
        assert scale[c].item() == pytest.approx(s_c, rel=1e-6) and zp[c].item() == z_c


def test_percentile_clips_outliers():
    rows = torch.cat([torch.linspace(-1, 1, 10000), torch.tensor([50.0])]).reshape(-1, 1)
    s_pct, _ = init_percentile(rows, 8, False, 0.999)
    s_mm, _ = init_minmax(rows, 8, False)
    assert s_pct.item() < s_mm.item() / 10


def test_activation_quantizer_requires_explicit_init():
    q = ActivationQuantizer(bits=8)
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="before initialisation"):
        q(x)
    assert not q.initialized  # still not initialised after the failed call
    assert torch.equal(q(x, enabled=False), x)


def test_activation_quantizer_aggregates_batches():
    q = ActivationQuantizer(bits=8, init_method="minmax", max_samples=2000)
    batches = [torch.randn(500) * (i + 1) for i in range(5)]
    for b in batches:
        q.observe(b)
    assert q.observer.samples.shape[0] == 2000 and q.observer.seen == 2500
    q.init_from_observations()
    allx = torch.cat(batches)
    expected, _ = minmax_qparams(allx.min(), allx.max(), 8, False)
    torch.testing.assert_close(q.scale.detach(), expected)
    assert q.observer is None  # statistics are dropped once used


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_activation_quantizer_sample_is_spread_over_batches(method):
    q = ActivationQuantizer(bits=8, init_method=method, max_samples=1000)
    for i in range(10):
        q.observe(torch.full((1000,), float(i)))
    values = q.observer.samples.flatten()
    counts = torch.bincount(values.long(), minlength=10)
    assert (counts > 50).all()  # every batch is represented, not just the last ones
    q.init_from_observations()
    assert q.initialized


def test_activation_quantizer_per_channel():
    q = ActivationQuantizer(bits=8, axis=1, num_channels=3, init_method="minmax")
    x = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 10.0, 100.0]).reshape(1, 3, 1, 1)
    q.calibrate(x)
    assert q.scale.shape == (3,) and q.scale[0] < q.scale[1] < q.scale[2]
    ref = torch.fake_quantize_per_channel_affine(x, q.scale.detach(), q.zero_point, 1, 0, 255)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0)


def test_sixteen_bits_is_identity():
    x = torch.randn(3, 4)
    assert torch.equal(ActivationQuantizer(bits=16)(x), x)
    wq = WeightQuantizer(bits=16, num_channels=3)
    wq.init_from_weight(x)
    assert torch.equal(wq(x), x)


def test_weight_quantizer_matches_torch_per_channel():
    w = torch.randn(6, 4, 3, 3)
    wq = WeightQuantizer(bits=4, symmetric=True, axis=0, num_channels=6)
    wq.init_from_weight(w, "mse")
    ref = torch.fake_quantize_per_channel_affine(w, wq.scale.detach(), wq.zero_point, 0, -8, 7)
    torch.testing.assert_close(wq(w), ref, rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(BITS), symmetric=st.booleans(), layout=st.sampled_from(["tensor", "channel", "sample"]),
       seed=st.integers(0, 2**16), factor=st.sampled_from([1.0, 0.037]), x_grad=st.booleans())
def test_one_node_fake_quant_equals_torchs_lsq_kernels(bits, symmetric, layout, seed, factor, x_grad):
    """Value bit for bit and the x gradient exactly as torch's learnable fake-quant kernels (LSQ); the step-size
    gradient to float rounding (its per-element terms are summed in another order). Layouts: one step size, one
    per channel, one per sample (timestep groups: a (B, 1, 1, 1) scale)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 4, 5, 5, generator=g) * 3).requires_grad_(x_grad)
    qmin, qmax = quant_range(bits, symmetric)
    axis = {"tensor": None, "channel": 1, "sample": 0}[layout]
    n = 1 if axis is None else x.shape[axis]
    scale = (torch.rand(n, generator=g) * 0.5 + 0.01).requires_grad_(True)
    zp = torch.zeros(n, dtype=torch.int32) if symmetric else \
        torch.randint(qmin, qmax + 1, (n,), generator=g, dtype=torch.int32)
    upstream = torch.randn(x.shape, generator=g)
    out = fake_quantize(x, scale, zp, qmin, qmax, axis=axis, grad_factor=factor)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "FakeQuantizeLSQBackward"
    out.backward(upstream)
    x_ref, s_ref = x.detach().clone().requires_grad_(True), scale.detach().clone().requires_grad_(True)
    if axis is None:
        ref = torch._fake_quantize_learnable_per_tensor_affine(x_ref, s_ref, zp.float(), qmin, qmax, factor)
    else:
        ref = torch._fake_quantize_learnable_per_channel_affine(x_ref, s_ref, zp.float(), axis, qmin, qmax, factor)
    ref.backward(upstream)
    assert torch.equal(out, ref)
    assert torch.equal(x.grad, x_ref.grad) if x_grad else x.grad is None
    # float32 sums of terms up to |upstream| * (qmax - qmin) in another order: tolerance from that bound
    bound = factor * upstream.abs().sum().item() * (qmax - qmin) * 1e-6
    torch.testing.assert_close(scale.grad, s_ref.grad, rtol=0, atol=bound)
    assert s_ref.grad.abs().sum() > 0
    with torch.no_grad():  # the same value without autograd
        assert torch.equal(fake_quantize(x, scale, zp, qmin, qmax, axis=axis), out)


def test_one_node_fake_quant_saves_one_float_per_element():
    x = torch.randn(8, 16, 16, 16, requires_grad=True)
    scale, zp = torch.tensor(0.05, requires_grad=True), torch.tensor(100, dtype=torch.int32)
    out = FakeQuantizeLSQ.apply(x, scale, zp, 0, 255, 1.0)
    assert sum(t.numel() * t.element_size() for t in out.grad_fn.saved_tensors) == x.numel() * 4 + 4


# ----- invalid parameters are refused, not clamped into a silently wrong layer -----

@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("cls", [WeightQuantizer, ActivationQuantizer])
def test_set_qparams_refuses_an_invalid_scale(cls, scale):
    q = cls(bits=4, axis=None)
    with pytest.raises(ValueError, match=rf"scale {scale!r} is invalid; scales must be finite and > 0"):
        q.set_qparams(torch.tensor(scale), torch.tensor(0))


@pytest.mark.parametrize(("symmetric", "zero_point", "bounds"), [(False, 16, r"\[0, 15\]"), (False, -1, r"\[0, 15\]"),
                                                                 (True, -9, r"\[-8, 7\]")])
def test_set_qparams_refuses_an_out_of_range_zero_point(symmetric, zero_point, bounds):
    q = ActivationQuantizer(bits=4, symmetric=symmetric)
    with pytest.raises(ValueError, match=rf"zero point {zero_point} is outside the integer range {bounds}"):
        q.set_qparams(torch.tensor(0.1), torch.tensor(zero_point))


def test_a_negative_weight_scale_in_a_state_dict_is_named_not_clamped():
    # Before: the forward clamped -0.1 to float epsilon and the layer's output was zeros, without a word.
    layer = QuantLinear.from_module(nn.Linear(4, 3), weight_bits=4, act_bits=16)
    state = layer.state_dict()
    state["weight_quantizer.scale"] = state["weight_quantizer.scale"].clone().fill_(-0.1)
    with pytest.raises(ValueError, match=r"WeightQuantizer 'weight_quantizer': scale -0\.1\d* is invalid"):
        layer.load_state_dict(state)
    state["weight_quantizer.scale"].fill_(0.1)
    state["weight_quantizer.zero_point"].fill_(99)
    with pytest.raises(ValueError, match=r"zero point 99 is outside the integer range \[0, 15\]"):
        layer.load_state_dict(state)


def test_an_uncalibrated_activation_quantizer_loads_its_placeholder_scale():
    q = ActivationQuantizer(bits=8)
    fresh = ActivationQuantizer(bits=8)
    fresh.load_state_dict(q.state_dict())  # scale 1, zero point 0, not initialised: nothing to refuse
    assert not bool(fresh.initialized)
