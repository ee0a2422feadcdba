"""Deployed (packed integer) quantized models vs FP: file size, in-memory weight bytes, sampling time.

Quantizes the shipped digits teacher W8A8 and W4A8 with round-to-nearest (activation ranges from FP DDIM
trajectories), exports each as a deployable folder, loads it back in every execution mode and samples the same
noise with DDIM. Figures are printed, never asserted.

    OMP_NUM_THREADS=1 python -m benchmarks.export
    OMP_NUM_THREADS=1 python -m benchmarks.export --bits w4a8 --batch-size 64 --repeats 5

Columns: file = ``quantized.safetensors`` (FP: the diffusers ``diffusion_pytorch_model.safetensors``);
weights in memory = bytes of every parameter and buffer plus what the execution mode derives (the float cache,
the int8 weights); time = best of ``--repeats`` full sampling runs; max |diff| = largest pixel difference of the
final samples against the fake-quantized model the folder was exported from (0 = bit-identical); MSE vs FP =
mean squared pixel error against the FP samples from the same noise.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from accuquant_pl.deploy import set_execution, weight_bytes
from accuquant_pl.deploy.artifact import WEIGHTS_NAME, export_quantized, load_quantized
from accuquant_pl.diffusion import load_denoiser, load_scheduler_config, scheduler_from_config
from accuquant_pl.diffusion.sampling import initial_noise, sample
from accuquant_pl.quant import QuantSpec, rtn_quantize
from benchmarks.common import REPO, add_threads_argument, set_threads

MB = 1e6


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(REPO / "models" / "digits-ddpm"))
    p.add_argument("--bits", default="w8a8,w4a8", help="comma list of wXaY")
    p.add_argument("--modes", default="dequant,cached,int", help="execution modes of the loaded folder")
    p.add_argument("--batch-size", type=int, default=16, help="images per sampling run")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling runs per row (best is reported)")
    p.add_argument("--calibration-seeds", type=int, default=16, help="FP trajectories for activation ranges")
    add_threads_argument(p)
    return p.parse_args()


class _Recorder(nn.Module):
    """Passes calls to the UNet and keeps its inputs: the activation-calibration batches."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet, self.batches = unet, []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> object:
        self.batches.append({"sample": x.clone(), "timestep": torch.as_tensor(t).clone()})
        return self.unet(x, t)


def time_sampling(unet: nn.Module, scheduler: object, noise: torch.Tensor, steps: int,
                  repeats: int) -> tuple[float, torch.Tensor]:
    """Best wall time of ``repeats`` sampling runs, and the final samples."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = sample(unet, scheduler, noise, steps)
        best = min(best, time.perf_counter() - start)
    return best, out.clamp(-1, 1)


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    teacher = Path(args.teacher)
    fp = load_denoiser(teacher)
    scheduler_config = load_scheduler_config(teacher)
    scheduler = scheduler_from_config("ddim", scheduler_config)
    shape = (fp.config.in_channels, fp.config.sample_size, fp.config.sample_size)

    recorder = _Recorder(fp)
    sample(recorder, scheduler, initial_noise(range(args.calibration_seeds), shape), args.steps)
    calibration = recorder.batches  # every timestep of the FP trajectories

    noise = initial_noise(range(10_000, 10_000 + args.batch_size), shape)  # held-out seeds
    fp_file = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    fp_size, fp_bytes = fp_file.stat().st_size, weight_bytes(fp)
    fp_time, fp_samples = time_sampling(fp, scheduler, noise, args.steps, args.repeats)

    print(f"digits teacher ({sum(p.numel() for p in fp.parameters()) / 1e6:.2f}M params), DDIM {args.steps} steps, "
          f"batch {args.batch_size}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"best of {args.repeats}")
    header = ("| model | execution | file MB | file / FP | weights in memory MB | memory / FP | sampling s | "
              "time / FP | max abs diff vs fake-quant | MSE vs FP |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    def row(model: str, execution: str, size: float | None, mem: int, seconds: float, diff: float | None,
            samples: torch.Tensor) -> None:
        size_txt = f"{size / MB:.3f} | {size / fp_size:.3f}" if size is not None else "- | -"
        diff_txt = "-" if diff is None else f"{diff:.1e}"
        mse = (samples - fp_samples).pow(2).mean().item()
        print(f"| {model} | {execution} | {size_txt} | {mem / MB:.3f} | {mem / fp_bytes:.3f} | {seconds:.2f} | "
              f"{seconds / fp_time:.2f} | {diff_txt} | {mse:.2e} |", flush=True)

    row("FP32", "float", fp_size, fp_bytes, fp_time, None, fp_samples)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits.split(","):
            w, a = (int(v) for v in bits[1:].split("a"))
            fake = rtn_quantize(copy.deepcopy(fp), QuantSpec(weight_bits=w, act_bits=a), calibration).eval()
            fake_time, fake_samples = time_sampling(fake, scheduler, noise, args.steps, args.repeats)
            row(bits.upper(), "fake-quant (calibrated)", None, weight_bytes(fake), fake_time, 0.0, fake_samples)
            folder = export_quantized(fake, Path(tmp) / bits, scheduler_config=scheduler_config)
            size = (folder / WEIGHTS_NAME).stat().st_size
            deployed = load_quantized(folder)
            for mode in args.modes.split(","):
                fallbacks = set_execution(deployed, mode)
                seconds, samples = time_sampling(deployed, scheduler, noise, args.steps, args.repeats)
                label = mode if not fallbacks else f"{mode} ({len(fallbacks)} layers dequant)"
                diff = (samples - fake_samples).abs().max().item()
                row(bits.upper(), f"packed, {label}", size, weight_bytes(deployed), seconds, diff, samples)


if __name__ == "__main__":
    main()
