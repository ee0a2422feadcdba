"""Peak memory and time per iteration of the AccuQuant rollout for each gradient mode and group size n.

Models, both quantized W4A8 with AdaRound (accuquant_pl.quant.quantize + calibrate_activations on 3 random
batches) and run with soft AdaRound rounding everywhere:
- digits: the digits teacher (models/digits-ddpm when present, else the same architecture, random weights);
- cifar: google/ddpm-cifar10-32's architecture (35.7M parameters), random weights, 32x32x3.
theta (what gets gradients) = AdaRound V + activation step sizes of one reconstruction unit, the middle one in
forward order (``--theta unit``, as in block-wise calibration: gradients flow back from the output to that
unit), or of the whole model (``--theta all``: every layer's V gets a gradient, and the weight-quantization
graph of every layer is saved at every step, which dominates memory at small batch sizes).
Sampler: DDIM (eta = 0), 50 steps, group starting at step 10; targets = the unquantized model's DDIM states.

One iteration = one call of ``rollout(mode, ...)`` (forward + its own backward) from zeroed gradients.
Columns:
- peak saved-tensor MB: bytes of tensors packed into the autograd graph (saved_tensors_hooks) alive at once. It
  does not see what torch.utils.checkpoint saves and recomputes inside itself (checkpoint installs its own inner
  hooks), so for `checkpointed` it only shows the outer graph (the n small states);
- peak live-tensor MB: bytes of all tensor storages produced by aten ops during the iteration alive at once
  (TorchDispatchMode + weakrefs on storages): a CPU analogue of torch.cuda.max_memory_allocated, recomputation
  included; parameters, buffers and inputs that existed before are not counted, new .grad tensors are;
- peak RSS delta MB (CPU): VmHWM - VmRSS of this process around one iteration, after malloc_trim(0) and a reset
  of VmHWM through /proc/self/clear_refs (max over the timed iterations). It includes allocator slack and kernel
  workspaces; treat it as a rough check of the live-tensor column. On CUDA it is replaced by
  max_memory_allocated - memory_allocated (reset_peak_memory_stats before each iteration);
- s/iter: mean wall time of the timed iterations (trackers off). The tracked iteration runs first and serves
  as the warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from diffusers import DDIMScheduler, UNet2DModel
from torch import Tensor, nn

from accuquant_pl.calibration.rollout import GRADIENT_MODES, rollout
from accuquant_pl.quant import (
    QuantSpec,
    calibrate_activations,
    quant_state,
    quantize,
    reconstruction_units,
    unit_parameters,
)
from benchmarks.common import REPO, cifar_unet, proc_status_kb, reset_rss_peak
from benchmarks.memory import LiveTensorBytes, SavedTensorBytes

DIGITS_DIR = REPO / "models" / "digits-ddpm"
NUM_INFERENCE_STEPS, START = 50, 10
MB = 2**20


# ------------------------------------------------------------------------------------------------------ models


def digits_unet() -> tuple[nn.Module, str]:
    if (DIGITS_DIR / "unet").is_dir():
        from accuquant_pl.diffusion import load_denoiser

        return load_denoiser(DIGITS_DIR), "models/digits-ddpm"
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, attention_head_dim=32, norm_num_groups=8,
    ), "digits architecture, random weights"


MODELS = {"digits": digits_unet, "cifar": cifar_unet}
DEFAULT_BATCH = {("digits", "cpu"): 16, ("cifar", "cpu"): 4, ("digits", "cuda"): 16, ("cifar", "cuda"): 16}


def quantized(name: str, batch: int, device: torch.device, theta: str) -> tuple[nn.Module, str, str]:
    """The model quantized W4A8 + AdaRound, activations calibrated on 3 random batches; theta switched on."""
    unet, origin = MODELS[name]()
    unet = unet.to(device).eval()
    params = sum(p.numel() for p in unet.parameters())
    quantize(unet, QuantSpec(weight_bits=4, act_bits=8, adaround=True, act_timestep_groups=1))  # as throughput.py
    c, s = unet.config.in_channels, unet.config.sample_size
    g = torch.Generator().manual_seed(1)
    batches = [{"sample": torch.randn(batch, c, s, s, generator=g).to(device),
                "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device)} for _ in range(3)]
    calibrate_activations(unet, batches)
    unet.requires_grad_(False)
    if theta == "all":
        where, scope = "whole model", unet
    else:
        units = reconstruction_units(unet)
        where, scope = units[len(units) // 2]
    groups = unit_parameters(scope)
    for p in groups["adaround"] + groups["act_scale"]:
        p.requires_grad_(True)
    n_theta = sum(p.numel() for p in groups["adaround"] + groups["act_scale"])
    info = (f"{name}: {origin}, {params / 1e6:.2f}M parameters; theta = AdaRound V + act scales of {where} "
            f"({n_theta / 1e6:.2f}M)")
    return unet, info, where


# ------------------------------------------------------------------------------------------------------ bench


def bench_model(name: str, group_sizes: list[int], modes: list[str], batch: int, iters: int,
                device: torch.device, theta_scope: str, notes: list[str]) -> None:
    t0 = time.perf_counter()
    unet, info, _ = quantized(name, batch, device, theta_scope)
    theta = [p for p in unet.parameters() if p.requires_grad]
    notes.append(f"{info}; batch {batch}; quantize + calibrate {time.perf_counter() - t0:.1f} s")
    print(notes[-1], file=sys.stderr, flush=True)
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(NUM_INFERENCE_STEPS)
    timesteps = sched.timesteps[START:START + max(group_sizes)]  # CPU scalars: the UNet moves them
    c, s = unet.config.in_channels, unet.config.sample_size
    x0 = torch.randn(batch, c, s, s, generator=torch.Generator().manual_seed(2)).to(device)

    def network(j: int, x: Tensor) -> Tensor:
        return unet(sched.scale_model_input(x, timesteps[j]), timesteps[j]).sample

    def phi(j: int, x: Tensor, out: Tensor) -> Tensor:
        return sched.step(out, timesteps[j], x).prev_sample

    with torch.no_grad(), quant_state(unet, weight=False, act=False):  # FP targets
        states, x = [], x0
        for j in range(max(group_sizes)):
            x = phi(j, x, network(j, x))
            states.append(x)
    all_targets = torch.stack(states)

    def one_iter(mode: str, n: int) -> None:
        for p in theta:
            p.grad = None
        rollout(mode, network, phi, x0, all_targets[:n])
        if device.type == "cuda":
            torch.cuda.synchronize()

    for n in group_sizes:
        for mode in modes:
            for p in theta:  # tracked iteration, also the warm-up
                p.grad = None
            with SavedTensorBytes() as saved, LiveTensorBytes() as live:
                rollout(mode, network, phi, x0, all_targets[:n])
            times, peak_mem = [], 0.0
            for _ in range(iters):
                for p in theta:
                    p.grad = None
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                else:
                    rss_ok = reset_rss_peak()
                    base = proc_status_kb("VmRSS") * 1024
                start = time.perf_counter()
                one_iter(mode, n)
                times.append(time.perf_counter() - start)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated() - base
                else:
                    peak = proc_status_kb("VmHWM") * 1024 - base if rss_ok else float("nan")
                peak_mem = max(peak_mem, peak)
            row = {"model": name, "mode": mode, "n": n, "saved": saved.peak / MB, "live": live.peak / MB,
                   "mem": peak_mem / MB, "s_iter": sum(times) / len(times)}
            print(_fmt(row), flush=True)


def _fmt(r: dict) -> str:
    return (f"| {r['model']} | {r['mode']} | {r['n']} | {r['saved']:.1f} | {r['live']:.1f} | {r['mem']:.1f} "
            f"| {r['s_iter']:.3f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,cifar")
    ap.add_argument("--group-sizes", default="1,2,4,8")
    ap.add_argument("--modes", default=",".join(GRADIENT_MODES))
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default: 16 for digits, 4 for cifar on CPU (16 on CUDA)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (after the tracked warm-up one)")
    ap.add_argument("--theta", choices=["unit", "all"], default="unit",
                    help="quantization parameters that get gradients: the middle reconstruction unit's or all")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    sizes = [int(n) for n in args.group_sizes.split(",")]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    for m in modes:
        if m not in GRADIENT_MODES:
            ap.error(f"unknown gradient mode {m!r}; choose from {GRADIENT_MODES}")
    device = torch.device(args.device)
    batches = {m: args.batch_size or DEFAULT_BATCH[m, device.type] for m in models}
    mem_col = "peak CUDA alloc MB" if device.type == "cuda" else "peak RSS delta MB"
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch sizes "
          + ", ".join(f"{m} {b}" for m, b in batches.items())
          + f", theta {args.theta}, DDIM {NUM_INFERENCE_STEPS} steps from step {START}, "
          f"{args.iters} timed iterations after 1 tracked warm-up")
    print()
    print(f"| model | mode | n | peak saved-tensor MB | peak live-tensor MB | {mem_col} | s/iter |")
    print("|---|---|---|---|---|---|---|", flush=True)
    notes: list[str] = []
    for m in models:
        bench_model(m, sizes, modes, batches[m], args.iters, device, args.theta, notes)
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
