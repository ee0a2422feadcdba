"""Our quantizer against optimum-quanto on the robust protocol, calibrated on the same FP trajectories.

optimum-quanto (``pip install -c constraints.txt -e ".[peers]"``) quantizes the teacher with its own
``quantize`` / ``Calibration`` / ``freeze`` at W8A8, W8A16, W4A8 and W4A16; its activation ranges are
calibrated on exactly the inputs our activation calibration uses (``TrajectoryDataModule.calibration_inputs``).
Every row reports which tensors it quantizes, counted on the model (not taken from documentation): weights of
Conv2d / Linear layers, inputs of Conv2d / Linear layers, module outputs, attention act-act matmuls. Our rows
come twice: our default operation set, and quanto's (conv inputs and the attention matmuls left in float), so
that the comparison is fair both ways. Settings a peer cannot run say why in one line.

    OMP_NUM_THREADS=1 python -m benchmarks.peers [--bits w8a8,w8a16,w4a8,w4a16] [--smoke]

``--smoke`` runs every row on a tiny random UNet with 2 trajectories, 2 steps and 4 seeds (seconds; the test
suite runs it when optimum-quanto is installed).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from accuquant_pl.evaluation.digit_classifier import DigitClassifier
from accuquant_pl.io import atomic_write_json
from accuquant_pl.metrics.sample_errors import (
    PROTOCOL_NUM_SAMPLES,
    sample_error_stats,
)
from accuquant_pl.quant import QuantAttnProcessor, QuantSpec, quantized_layers, rtn_quantize
from accuquant_pl.quant.quantizers import ActivationQuantizer
from benchmarks.common import REPO, add_threads_argument
from benchmarks.protocol import FP_CACHE, setup_protocol

CONV_PATTERNS = ("*conv*",)  # every Conv2d of a diffusers UNet has 'conv' in its name; no Linear does


def our_spec(w: int, a: int, quanto_ops: bool) -> QuantSpec:
    """Our default spec at WwAa; ``quanto_ops``: conv inputs and attention matmuls left in float, as quanto does."""
    if not quanto_ops:
        return QuantSpec(weight_bits=w, act_bits=a)
    return QuantSpec(weight_bits=w, act_bits=a, quantize_attention_matmuls=False,
                     overrides=[{"pattern": p, "act_bits": 16} for p in CONV_PATTERNS])


def our_operations(model: nn.Module) -> dict[str, int]:
    counts = {"conv_weights": 0, "linear_weights": 0, "conv_inputs": 0, "linear_inputs": 0, "outputs": 0,
              "attention_matmuls": 0}
    for _, layer in quantized_layers(model):
        kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        counts[f"{kind}_weights"] += int(layer.weight_quantizer.bits < 16)
        counts[f"{kind}_inputs"] += int(any(not q.is_off for q in layer.modules() if isinstance(q, ActivationQuantizer)))
    counts["attention_matmuls"] = 2 * sum(isinstance(m, QuantAttnProcessor) and not m.query_quantizer.is_off
                                          for m in model.modules())
    return counts


def quanto_operations(model: nn.Module) -> dict[str, int]:
    from optimum.quanto.nn import QConv2d, QLinear

    counts = {"conv_weights": 0, "linear_weights": 0, "conv_inputs": 0, "linear_inputs": 0, "outputs": 0,
              "attention_matmuls": 0}
    for m in model.modules():
        if isinstance(m, (QConv2d, QLinear)):
            kind = "conv" if isinstance(m, QConv2d) else "linear"
            counts[f"{kind}_weights"] += int(m.weight_qtype is not None)
            # Calibration(streamline=True) removes the output hook of outputs consumed by non-quantized ops.
            hooks = getattr(m, "_quantize_hooks", {})
            counts[f"{kind}_inputs"] += int("input" in hooks and hooks["input"].id in m._forward_pre_hooks)
            counts["outputs"] += int("output" in hooks and hooks["output"].id in m._forward_hooks)
    return counts


def quanto_model(teacher: nn.Module, w: int, a: int | None, batches: list[dict[str, Any]]) -> nn.Module:
    from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

    model = copy.deepcopy(teacher)
    quantize(model, weights={8: qint8, 4: qint4}[w], activations=qint8 if a == 8 else None)
    if a is not None:
        with torch.no_grad(), Calibration():
            for batch in batches:
                model(batch["x"], batch["timestep"])
    freeze(model)
    return model.eval()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(REPO / "models" / "digits-ddpm"))
    p.add_argument("--bits", default="w8a8,w8a16,w4a8,w4a16")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-trajectories", type=int, default=64)
    p.add_argument("--act-calibration-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=PROTOCOL_NUM_SAMPLES)
    add_threads_argument(p)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "peers.json"))
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "trajectories"))
    p.add_argument("--smoke", action="store_true", help="tiny random UNet, seconds (used by the test suite)")
    return p.parse_args()


def _tiny_teacher(folder: Path) -> str:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return str(folder)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    protocol = setup_protocol(args.teacher, args.eval_samples, args.steps, args.num_trajectories, args.threads,
                              args.cache_dir, None if args.smoke else FP_CACHE)
    teacher, reference = protocol.teacher, protocol.reference
    batches = protocol.calibration_batches(args.act_calibration_samples)
    labeller = None if args.smoke else DigitClassifier().labels  # the smoke teacher's noise is no digit
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() and not args.smoke else []
    done = {(r["bits"], r["method"]) for r in rows}
    for bits in args.bits.split(","):
        w, a = (int(v) for v in bits[1:].split("a"))
        candidates = [("optimum-quanto 0.2.7", None), ("accuquant-pl RTN, quanto's operations", True),
                      ("accuquant-pl RTN, default operations", False)]
        for name, quanto_ops in candidates:
            if (bits, name) in done:
                continue
            start = time.time()
            if quanto_ops is None:
                if w not in (4, 8) or a not in (8, 16):
                    rows.append({"bits": bits, "method": name, "skipped": "quanto quantizes weights to int8/int4 "
                                 "(or float8) and activations to int8/float8 only"})
                    continue
                model = quanto_model(teacher, w, a if a < 16 else None, batches)
                operations = quanto_operations(model)
            else:
                model = rtn_quantize(copy.deepcopy(teacher), our_spec(w, a, quanto_ops), batches,
                                     protocol.scheduler.config.num_train_timesteps).eval()
                operations = our_operations(model)
            with torch.no_grad():
                q = protocol.samples(model)
            stats = sample_error_stats(reference, q, labeller=labeller)
            rows.append({"bits": bits, "method": name, "quantizes": operations, **stats.as_dict(),
                         "seconds": time.time() - start})
            print(f"{bits} {name}: mean {stats.mean:.5f} [{stats.mean_ci95[0]:.5f}, {stats.mean_ci95[1]:.5f}] "
                  f"median {stats.median:.6f} digit changed {stats.label_change_share} quantizes {operations}",
                  flush=True)
            if not args.smoke:
                atomic_write_json(out, {"settings": vars(args), "rows": rows})
    return rows


def main() -> None:
    args = parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            args.teacher = _tiny_teacher(Path(tmp) / "tiny")
            args.cache_dir = str(Path(tmp) / "cache")
            # 4 DDIM steps of the tiny model's 100 training timesteps: one in each of the 4 default timestep groups
            args.steps, args.num_trajectories, args.act_calibration_samples, args.eval_samples = 4, 2, 8, 4
            run(args)
        return
    run(args)


if __name__ == "__main__":
    main()
