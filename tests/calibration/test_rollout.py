"""The AccuQuant n-step rollout and its four gradient modes (accuquant_pl/calibration/rollout.py).

Set-up: a tiny diffusers UNet2DModel (float parameters as theta, or quantized W4A8 with AdaRound so theta =
AdaRound V + activation step sizes, as in calibration) and a real DDIMScheduler (eta = 0, 10 steps) as phi.
Every reference below is computed by hand, without rollout.py.

Gradient tolerance (``assert_grads_close``): ||got - ref|| <= 1e-4 ||ref|| and, elementwise,
|got - ref| <= 1e-4 |ref| + 1e-6 ||ref||. Modes that compute the same maths agree to float32 rounding.

Memory is measured in two ways (same code as benchmarks/memory_vs_group_size.py):
- saved-tensor bytes: tensors packed into the autograd graph (``saved_tensors_hooks``), freed by a weakref
  finaliser when the graph lets go of them. Blind to what ``torch.utils.checkpoint`` saves and recomputes
  (it installs its own, inner hooks), so for ``checkpointed`` it only sees the outer graph;
- live-tensor bytes: every tensor storage produced by an aten op while a TorchDispatchMode is active, freed by a
  weakref on the storage: a CPU analogue of ``torch.cuda.max_memory_allocated`` that sees the recomputation.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

from accuquant_pl.calibration.objectives import accuquant_step
from accuquant_pl.calibration.rollout import GRADIENT_MODES, rollout, state_loss
from accuquant_pl.quant import QuantSpec, calibrate_activations, quant_state, quantize, unit_parameters
from benchmarks.memory import LiveTensorBytes, SavedTensorBytes
from tests.calibration.gradients import flat_grad, theta, zero
from tests.conftest import tiny_unet

MODES = ("exact", "checkpointed", "approx", "stepwise")
START = 2  # the group starts at the third of the 10 DDIM steps
RTOL = 1e-4


# --------------------------------------------------------------------------------------------- helpers


def ddim() -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)  # eta = 0 is step()'s default
    sched.set_timesteps(10)
    return sched


class Group:
    """One rollout group: network(j, x), phi(j, x, out), start state x and FP targets (n, B, ...)."""

    def __init__(self, unet: nn.Module, n: int, batch: int = 4, seed: int = 0, teacher: nn.Module | None = None):
        self.unet, self.n, self.sched = unet, n, ddim()
        self.timesteps = self.sched.timesteps[START:START + n]
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, 1, 8, 8, generator=g)
        with torch.no_grad():  # FP targets: the teacher's (or the unquantized model's) DDIM states
            if teacher is not None:
                self.targets = self.states(lambda j, x: self._out(teacher, j, x))
            else:
                with quant_state(unet, weight=False, act=False):
                    self.targets = self.states(self.network)

    def _out(self, model: nn.Module, j: int, x: Tensor) -> Tensor:
        t = self.timesteps[j]
        return model(self.sched.scale_model_input(x, t), t).sample

    def network(self, j: int, x: Tensor) -> Tensor:
        return self._out(self.unet, j, x)

    def phi(self, j: int, x: Tensor, out: Tensor) -> Tensor:
        return self.sched.step(out, self.timesteps[j], x).prev_sample

    def states(self, network) -> Tensor:
        """(n, B, ...) states after each step of a rollout with ``network``."""
        out, x = [], self.x
        for j in range(self.n):
            x = self.phi(j, x, network(j, x))
            out.append(x)
        return torch.stack(out)


def run(mode: str, g: Group, network=None, params=None, reduction="mean", scale=1.0) -> tuple[Tensor, Tensor]:
    """Loss and flattened gradient of one rollout of ``mode`` from zero gradients."""
    params = theta(g.unet) if params is None else params
    zero(params)
    loss = rollout(mode, network or g.network, g.phi, g.x, g.targets, reduction, scale)
    assert not loss.requires_grad
    return loss, flat_grad(params)


def assert_grads_close(got: Tensor, ref: Tensor, rtol: float = RTOL) -> None:
    norm = ref.norm().item()
    assert norm > 0, "reference gradient is zero: the test would prove nothing"
    rel = ((got - ref).norm() / norm).item()
    assert rel <= rtol, f"relative gradient error {rel:.3g} > {rtol}"
    torch.testing.assert_close(got, ref, rtol=rtol, atol=1e-6 * norm)


def rel_diff(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def float_student() -> nn.Module:
    return tiny_unet(seed=0).eval()


def float_teacher() -> nn.Module:
    return tiny_unet(seed=1).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def qunet() -> nn.Module:
    """Tiny UNet quantized W4A8 with AdaRound; theta = AdaRound V + activation step sizes."""
    unet = tiny_unet(seed=0).eval()
    quantize(unet, QuantSpec(weight_bits=4, act_bits=8, adaround=True))
    gen = torch.Generator().manual_seed(5)
    sched = ddim()
    calibrate_activations(unet, [{"sample": torch.randn(4, 1, 8, 8, generator=gen), "timestep": t}
                                 for t in sched.timesteps[::2]])
    unet.requires_grad_(False)
    groups = unit_parameters(unet)
    assert groups["adaround"] and groups["act_scale"]
    for p in groups["adaround"] + groups["act_scale"]:
        p.requires_grad_(True)
    return unet


def group(kind: str, n: int, qunet: nn.Module, **kw) -> Group:
    if kind == "quant":
        return Group(qunet, n, **kw)
    return Group(float_student(), n, teacher=float_teacher(), **kw)


KINDS = ("float", "quant")

# ------------------------------------------------------------------------------------------ equalities


def test_quantized_theta_is_only_adaround_v_and_act_scales(qunet):
    params = theta(qunet)
    groups = unit_parameters(qunet)
    assert {id(p) for p in params} == {id(p) for p in groups["adaround"] + groups["act_scale"]}
    assert len(params) < len(list(qunet.parameters()))


@pytest.mark.parametrize("kind", KINDS)
def test_n1_all_modes_give_the_same_loss_and_gradient(kind, qunet):
    g = group(kind, 1, qunet)
    # Reference by hand: one step, loss against the FP state after it.
    params = theta(g.unet)
    zero(params)
    ref_loss = (g.phi(0, g.x, g.network(0, g.x)) - g.targets[0]).pow(2).mean()
    ref_loss.backward()
    ref_grad = flat_grad(params)
    for mode in MODES:
        loss, grad = run(mode, g)
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=0)
        assert_grads_close(grad, ref_grad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_exact_matches_hand_rollout_and_checkpointed_equals_exact(kind, n, qunet):
    g = group(kind, n, qunet)
    params = theta(g.unet)
    zero(params)
    ref_loss = (g.states(g.network)[-1] - g.targets[-1]).pow(2).mean()
    ref_loss.backward()
    ref_grad = flat_grad(params)
    loss_e, grad_e = run("exact", g)
    loss_c, grad_c = run("checkpointed", g)
    torch.testing.assert_close(loss_e, ref_loss.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_c, ref_loss.detach(), rtol=1e-6, atol=0)
    assert_grads_close(grad_e, ref_grad)
    assert_grads_close(grad_c, grad_e)


class ConstantOutput(nn.Module):
    """A 'network' whose output ignores x: a learnable tensor, different at every step."""

    def __init__(self, n: int, shape: tuple[int, ...]):
        super().__init__()
        self.table = nn.Parameter(torch.randn(n, *shape, generator=torch.Generator().manual_seed(3)))

    def forward(self, j: int, x: Tensor) -> Tensor:
        return self.table[j].expand_as(x) * 1.0


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_approx_equals_exact_when_the_output_does_not_depend_on_x(n, qunet):
    g = group("quant", n, qunet)
    # (a) the quantized UNet fed a fixed input: theta = V and act scales, x enters only through phi.
    const = torch.randn(g.x.shape, generator=torch.Generator().manual_seed(7))

    def fixed_input(j: int, x: Tensor) -> Tensor:
        return g.network(j, const)

    loss_e, grad_e = run("exact", g, fixed_input)
    loss_a, grad_a = run("approx", g, fixed_input)
    torch.testing.assert_close(loss_a, loss_e, rtol=1e-6, atol=0)
    assert_grads_close(grad_a, grad_e)
    # (b) a learnable tensor broadcast over the batch.
    table = ConstantOutput(n, tuple(g.x.shape[1:]))
    params = list(table.parameters())
    _, grad_e = run("exact", g, table, params)
    _, grad_a = run("approx", g, table, params)
    assert_grads_close(grad_a, grad_e)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_approx_is_exact_with_the_network_input_detached(kind, n, qunet):
    """The definition (METHOD.md): no gradient through the network's input, the sampler's own dependence kept."""
    g = group(kind, n, qunet)
    _, grad_ref = run("exact", g, lambda j, x: g.network(j, x.detach()))
    _, grad_a = run("approx", g)
    assert_grads_close(grad_a, grad_ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_approx_differs_from_exact_when_the_output_depends_on_x(kind, n, qunet):
    g = group(kind, n, qunet)
    loss_e, grad_e = run("exact", g)
    loss_a, grad_a = run("approx", g)
    torch.testing.assert_close(loss_a, loss_e, rtol=1e-6, atol=0)  # same forward rollout
    # Measured: relative difference 1.5-2.5% (quantized) and 4-7% (float) for n = 2..4 on these tiny random
    # UNets, whose output depends only weakly on x; modes computing the same maths differ by ~1e-7.
    assert rel_diff(grad_a, grad_e) > 5e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_stepwise_is_the_sum_of_detached_per_step_losses(kind, n, qunet):
    g = group(kind, n, qunet)
    params = theta(g.unet)
    zero(params)
    with torch.no_grad():  # the quantized rollout's own states
        xs = torch.cat([g.x[None], g.states(g.network)[:-1]])
    losses = [(g.phi(j, xs[j], g.network(j, xs[j])) - g.targets[j]).pow(2).mean() for j in range(n)]
    torch.stack(losses).sum().backward()
    ref_grad = flat_grad(params)
    loss, grad = run("stepwise", g)
    torch.testing.assert_close(loss, torch.stack(losses).sum().detach(), rtol=1e-6, atol=0)
    assert_grads_close(grad, ref_grad)
    if n == 1:
        _, grad_e = run("exact", g)
        assert_grads_close(grad, grad_e)
    else:  # only the last term looks at the group's final target
        assert not torch.allclose(loss, run("exact", g)[0])


# ------------------------------------------------------------------------- scale, reduction, accumulation


@pytest.mark.parametrize("mode", MODES)
def test_scale_reduction_and_gradient_accumulation(mode, qunet):
    g = group("quant", 2, qunet)
    params = theta(g.unet)
    loss, grad = run(mode, g)
    # scale multiplies the gradient, not the returned loss
    loss3, grad3 = run(mode, g, scale=3.0)
    torch.testing.assert_close(loss3, loss, rtol=1e-6, atol=0)
    assert_grads_close(grad3, 3 * grad)
    # sum_per_sample = numel per sample x mean
    per_sample = g.x[0].numel()
    loss_s, grad_s = run(mode, g, reduction="sum_per_sample")
    torch.testing.assert_close(loss_s, per_sample * loss, rtol=1e-5, atol=0)
    assert_grads_close(grad_s, per_sample * grad)
    # gradients accumulate into .grad like any backward (the trainer zeroes them)
    run(mode, g)
    rollout(mode, g.network, g.phi, g.x, g.targets)
    assert_grads_close(flat_grad(params), 2 * grad)


# ------------------------------------------------------------------------------------------- accuquant_step


@pytest.mark.parametrize("mode", MODES)
def test_accuquant_step_wires_unet_and_ddim_into_the_rollout(mode, qunet):
    g = group("quant", 3, qunet)
    batch = {"x": g.x, "timesteps": g.timesteps[None].expand(len(g.x), -1),
             "targets": g.targets.transpose(0, 1)}  # data module layout: (B, n, ...)
    params = theta(g.unet)
    ref_loss, ref_grad = run(mode, g)
    zero(params)
    loss = accuquant_step(g.unet, g.sched, batch, None, mode, "mean")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert_grads_close(flat_grad(params), ref_grad)
    if mode == "approx":  # the graphs kept: the same, bit for bit, through the same wiring
        grad = flat_grad(params)
        zero(params)
        assert torch.equal(accuquant_step(g.unet, g.sched, batch, None, mode, "mean", recompute=False), loss)
        assert torch.equal(flat_grad(params), grad)


def test_the_final_stage_passes_its_recompute_setting_to_the_rollout(monkeypatch):
    from accuquant_pl.calibration import BlockReconstruction, FinalStage, objectives

    seen = []
    monkeypatch.setattr(objectives, "accuquant_step", lambda *a, **k: seen.append(a[-1]) or torch.zeros(()))
    for recompute in (False, True):
        settings = BlockReconstruction(final_stage=FinalStage(recompute=recompute)).settings
        objectives.epoch_objective(settings, None, None, objectives.FINAL_STAGE, None, None, {}, None, 1.0, None)
    assert seen == [False, True]


# --------------------------------------------------------------------------- approx with its graphs kept


@pytest.mark.parametrize("kind", KINDS)
def test_approx_keeping_its_step_graphs_is_the_recomputing_approx_bit_for_bit(kind, qunet):
    g = group(kind, 4, qunet)
    params = theta(g.unet)
    zero(params)
    ref_loss = rollout("approx", g.network, g.phi, g.x, g.targets, "sum_per_sample", 0.5)
    ref = flat_grad(params)
    assert ref.abs().sum() > 0
    forwards = []

    def counted(j, x):
        forwards.append(j)
        return g.network(j, x)

    zero(params)
    loss = rollout("approx", counted, g.phi, g.x, g.targets, "sum_per_sample", 0.5, recompute=False)
    assert torch.equal(loss, ref_loss) and torch.equal(flat_grad(params), ref)
    assert forwards == [0, 1, 2, 3]  # one evaluation per step (the recomputing mode makes two)


def test_recompute_false_is_refused_outside_approx(qunet):
    g = group("quant", 2, qunet)
    with pytest.raises(ValueError, match="recompute=False keeps the step graphs of gradient mode 'approx'; "
                                         "mode 'exact'"):
        rollout("exact", g.network, g.phi, g.x, g.targets, recompute=False)


# ------------------------------------------------------------------------------------------------ memory


def test_live_tensor_tracker_sees_allocations_and_frees():
    with LiveTensorBytes() as m:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2
        del b
        c = a.view(10, 100)  # a view: no new storage
    assert m.peak == 8000 and m.live == 4000
    del a, c
    assert m.live == 0


def test_memory_checkpointed_and_approx_do_not_grow_with_n_exact_does():
    unet, teacher = float_student(), float_teacher()
    saved, live = {}, {}
    for n in (1, 2, 4):
        g = Group(unet, n, batch=16, teacher=teacher)  # activations dominate the parameter gradients
        for mode in MODES:
            zero(theta(unet))
            with SavedTensorBytes() as s, LiveTensorBytes() as m:
                rollout(mode, g.network, g.phi, g.x, g.targets)
            assert s.live == 0  # every graph freed
            saved[mode, n], live[mode, n] = s.peak, m.peak
        zero(theta(unet))
        with SavedTensorBytes() as s, LiveTensorBytes() as m:
            rollout("approx", g.network, g.phi, g.x, g.targets, recompute=False)
        assert s.live == 0
        saved["approx kept", n], live["approx kept", n] = s.peak, m.peak
    table = {k: (saved[k] / 2**20, live[k] / 2**20) for k in saved}
    # exact keeps n steps' graphs: the measurement is real
    assert saved["exact", 4] >= 3.5 * saved["exact", 1], table
    assert live["exact", 4] >= 3 * live["exact", 1], table
    for mode in ("checkpointed", "approx", "stepwise"):
        assert live[mode, 4] <= 1.5 * live[mode, 1], (mode, table)
        assert live[mode, 4] <= 0.5 * live["exact", 4], (mode, table)
    for mode in ("approx", "stepwise"):  # one step's graph at a time
        assert saved[mode, 4] <= 1.1 * saved[mode, 1], (mode, table)
    # approx with its graphs kept holds n steps' graphs at once, as exact does
    assert saved["approx kept", 4] >= 3.5 * saved["approx kept", 1], table
    assert saved["approx kept", 4] <= 1.1 * saved["exact", 4], table
    # checkpointed: no network activations in the outer graph (its recomputation shows in `live` only)
    assert saved["checkpointed", 4] <= 0.1 * saved["exact", 1], table


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_gradient_mode_is_named():
    g = Group(float_student(), 1, teacher=float_teacher())
    assert set(GRADIENT_MODES) == set(MODES)
    with pytest.raises(ValueError, match="'exactt'"):
        rollout("exactt", g.network, g.phi, g.x, g.targets)
    assert all(p.grad is None for p in g.unet.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_unknown_reduction_raises_before_any_backward(mode):
    g = Group(float_student(), 2, teacher=float_teacher())
    with pytest.raises(ValueError, match="'median'"):
        rollout(mode, g.network, g.phi, g.x, g.targets, reduction="median")
    assert all(p.grad is None for p in g.unet.parameters())
    with pytest.raises(ValueError, match="'median'"):
        state_loss(g.x, g.x, "median")
