"""Calibration throughput and peak memory on a CIFAR-10-size UNet: per-step baseline vs AccuQuant (n = 1..8).

Model: diffusers UNet2DModel with google/ddpm-cifar10-32's architecture (35.75M parameters, 32x32x3), random
weights (``benchmarks.common.cifar_unet``), quantized W4A8 with AdaRound (soft rounding) and activation ranges
calibrated on 3 random batches. One calibration iteration is what ``BlockReconstruction.training_step`` does for
one reconstruction unit, the middle one in forward order (units before it and itself quantized, later units FP,
as in block-wise calibration), with the objectives' own code:
- ``per_step``: ``per_step_loss`` (the FP teacher's and the student's block outputs on one DDIM step, the teacher
  forward stopped at the block) + backward;
- ``accuquant`` n: ``accuquant_step`` with the ``checkpointed`` gradient (n-step DDIM rollout on the real
  ``scheduler.step``, exact gradient, each step recomputed in the backward pass);
each followed by the AdaRound regulariser's backward and one Adam step on the unit's parameters.
Batches are FP DDIM states (100 steps, eta 0) of the same model from random noise, group starting at step 40.

Columns:
- s/iter and it/s: mean over the timed iterations (after one warm-up iteration that also tracks memory);
- x per-step: s/iter relative to the per-step baseline's (AccuQuant n costs ~2n forwards + n backwards);
- peak live-tensor MB: bytes of tensors created during the warm-up iteration alive at once
  (``benchmarks.memory.LiveTensorBytes``: recomputation included, model weights excluded);
- CPU: peak RSS delta MB = VmHWM - VmRSS around one timed iteration after malloc_trim and a VmHWM reset
  (``benchmarks.common.reset_rss_peak``; allocator slack included, max over the timed iterations);
  CUDA: peak alloc MB = torch.cuda.max_memory_allocated over the timed iterations (weights, optimizer and
  activations: the number that must fit on the GPU) and its growth over the memory allocated before them.

    OMP_NUM_THREADS=1 python -m benchmarks.throughput --device cpu --batch-size 4 --iters 2
    python -m benchmarks.throughput --device cuda --batch-size 32 --iters 10 [--autocast bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import time
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from accuquant_pl.calibration.objectives import accuquant_step, per_step_loss
from accuquant_pl.quant import (
    QuantSpec,
    adaround_regularizer,
    calibrate_activations,
    quantize,
    reconstruction_units,
    set_quant_state,
    unit_parameters,
)
from benchmarks.common import cifar_unet, proc_status_kb, reset_rss_peak
from benchmarks.memory import LiveTensorBytes

NUM_INFERENCE_STEPS, START = 100, 40
MB = 2**20


def build(batch: int, device: torch.device) -> dict[str, Any]:
    """FP teacher, W4A8 student with the middle unit trainable, its Adam optimiser, and the FP DDIM states."""
    teacher, _ = cifar_unet()
    teacher = teacher.to(device).eval().requires_grad_(False)
    # One activation range: the figures stay comparable with earlier runs, and a few random calibration timesteps
    # need not cover every timestep group.
    student = quantize(copy.deepcopy(teacher), QuantSpec(weight_bits=4, act_bits=8, adaround=True,
                                                         act_timestep_groups=1))
    g = torch.Generator().manual_seed(1)
    c, s = teacher.config.in_channels, teacher.config.sample_size
    calibrate_activations(student, [{"sample": torch.randn(batch, c, s, s, generator=g).to(device),
                                     "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device)}
                                    for _ in range(3)])
    student.requires_grad_(False)
    units = reconstruction_units(student)
    e = len(units) // 2
    for i, (_, module) in enumerate(units):
        set_quant_state(module, weight=i <= e, act=i <= e)
    name, unit = units[e]
    groups = unit_parameters(unit)
    lrs = {"adaround": 1e-3, "act_scale": 4e-5, "weight_scale": 1e-4}
    params = [{"params": ps, "lr": lrs[k]} for k, ps in groups.items() if ps]
    for group in params:
        for p in group["params"]:
            p.requires_grad_(True)
    optimizer = torch.optim.Adam(params)
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(NUM_INFERENCE_STEPS)
    x = torch.randn(batch, c, s, s, generator=torch.Generator().manual_seed(2)).to(device)
    states = [x]
    with torch.no_grad():
        for j in range(8):
            t = sched.timesteps[START + j]
            states.append(sched.step(teacher(sched.scale_model_input(states[-1], t), t).sample, t,
                                     states[-1]).prev_sample)
    return {"teacher": teacher, "student": student, "unit_name": name, "unit": unit, "optimizer": optimizer,
            "scheduler": sched, "states": torch.stack(states, 1), "theta": sum(p.numel() for g in params
                                                                               for p in g["params"])}


def batch_for(setup: dict[str, Any], n: int) -> dict[str, Tensor]:
    """A calibration batch as ``TrajectoryGroups`` collates it: every item starts at step START."""
    states, sched = setup["states"], setup["scheduler"]
    b, device = states.shape[0], states.device
    return {"x": states[:, 0], "target": states[:, n], "targets": states[:, 1 : n + 1],
            "timesteps": sched.timesteps[START : START + n].to(device).expand(b, n),
            "step_index": torch.full((b,), START, dtype=torch.long)}


def iteration(setup: dict[str, Any], objective: str, n: int, autocast: str | None) -> None:
    """One calibration iteration of the unit: objective + its backward, regulariser backward, Adam step."""
    opt, unit, student = setup["optimizer"], setup["unit"], setup["student"]
    opt.zero_grad(set_to_none=True)
    batch = batch_for(setup, n)
    device = batch["x"].device
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast == "bf16" else contextlib.nullcontext())
    with ctx:
        if objective == "per_step":
            teacher = setup["teacher"]
            loss = per_step_loss(student, teacher, unit, teacher.get_submodule(setup["unit_name"]), setup["scheduler"],
                                 batch, None, "sum_per_sample")
            loss.backward()
        else:
            accuquant_step(student, setup["scheduler"], batch, None, "checkpointed", "sum_per_sample")
        rounding = adaround_regularizer(unit, 2.0).to(device)
    if rounding.requires_grad:
        (0.01 * rounding).backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(setup: dict[str, Any], objective: str, n: int, iters: int, autocast: str | None) -> dict[str, float]:
    device = setup["states"].device
    with LiveTensorBytes() as live:  # warm-up iteration, tracked
        iteration(setup, objective, n, autocast)
    times, peak, growth = [], 0.0, 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(iters):
        if device.type != "cuda":
            rss_ok = reset_rss_peak()
            base = proc_status_kb("VmRSS") * 1024
        start = time.perf_counter()
        iteration(setup, objective, n, autocast)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
            growth = peak - base
        else:
            growth = max(growth, proc_status_kb("VmHWM") * 1024 - base if rss_ok else float("nan"))
    s_iter = sum(times) / len(times)
    return {"s_iter": s_iter, "it_s": 1 / s_iter, "live": live.peak / MB, "peak": peak / MB, "growth": growth / MB}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    ap.add_argument("--group-sizes", default="1,2,4,8", help="AccuQuant n values")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per row (default: 2 CPU, 10 CUDA)")
    ap.add_argument("--autocast", choices=["bf16"], default=None, help="bfloat16 autocast, as precision bf16-mixed")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch_size or (32 if device.type == "cuda" else 4)
    iters = args.iters or (10 if device.type == "cuda" else 2)
    sizes = [int(n) for n in args.group_sizes.split(",") if n]
    if any(not 1 <= n <= 8 for n in sizes):
        ap.error("group sizes must lie in 1..8")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    setup = build(batch, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"autocast {args.autocast or 'off (fp32)'}; CIFAR-10 DDPM architecture (35.75M parameters), W4A8 AdaRound, "
          f"batch {batch}, unit {setup['unit_name']} ({setup['theta'] / 1e6:.2f}M trainable), DDIM "
          f"{NUM_INFERENCE_STEPS} steps from step {START}; {iters} timed iterations after 1 tracked warm-up; "
          f"setup {time.perf_counter() - t0:.1f} s")
    print()
    mem = "peak CUDA alloc MB | growth MB" if device.type == "cuda" else "peak RSS delta MB"
    print(f"| objective | n | s/iter | it/s | x per-step | peak live-tensor MB | {mem} |")
    print("|---|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else ""), flush=True)
    rows = [("per_step", 1)] + [("accuquant", n) for n in sizes]
    baseline = None
    for objective, n in rows:
        r = measure(setup, objective, n, iters, args.autocast)
        baseline = baseline or r["s_iter"]
        cols = f"{r['peak']:.0f} | {r['growth']:.0f}" if device.type == "cuda" else f"{r['growth']:.0f}"
        label = "per_step (Q-Diffusion/BRECQ)" if objective == "per_step" else "accuquant checkpointed"
        print(f"| {label} | {n} | {r['s_iter']:.3f} | {r['it_s']:.2f} | {r['s_iter'] / baseline:.1f} | "
              f"{r['live']:.0f} | {cols} |", flush=True)


if __name__ == "__main__":
    main()
