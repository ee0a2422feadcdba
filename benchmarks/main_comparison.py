"""The main comparison on the robust protocol: RTN, per-step, AccuQuant over bit widths and calibration seeds.

Every row calibrates the shipped digits teacher with a shipped config, exactly as a user runs it
(``python main.py fit --config configs/digits_<bits>_<method>.yaml``, in a subprocess, with the calibration seed
as ``seed_everything`` and the trajectory seed), loads the exported folder and evaluates it on the robust
protocol (``accuquant_pl.metrics.sample_errors``): 1024 held-out seeds sampled in batches of 64, per-sample final
MSE against the FP samples of the same noises, the share of changed digits, FID against real held-out digits,
FID2FP32 and KID on the same samples, and the error-accumulation curve on the first 256 seeds.

Methods:
    rtn                 configs/digits_<bits>_rtn.yaml
    per_step            configs/digits_<bits>_qdiff.yaml (Q-Diffusion / BRECQ per-step reconstruction)
    accuquant           configs/digits_<bits>_accuquant.yaml (the shipped recipe, with its final stage)
    accuquant_block_n2  the AccuQuant config's units with block-output targets over n = 2 steps, no final stage

Rows are written to the JSON after each one and a rerun skips them; a calibration killed half-way resumes from
its last checkpoint. Only rows of one sweep on one machine are comparable (docs/results.md says why).

    python -m benchmarks.main_comparison --threads 2 [--bits w4a8] [--methods ...] [--seeds 0,1,2,3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accuquant_pl.deploy import load_quantized
from accuquant_pl.diffusion.conditioning import ConditioningSpec
from accuquant_pl.evaluation.digit_classifier import DigitClassifier
from accuquant_pl.evaluation.paired import paired_errors, samples_from
from accuquant_pl.evaluation.quality import SampleQualityMeter
from accuquant_pl.io import atomic_write_json
from accuquant_pl.metrics.sample_errors import (
    PROTOCOL_BATCH_SIZE,
    PROTOCOL_FIRST_SEED,
)
from benchmarks.common import REPO, add_threads_argument, set_threads
from benchmarks.launch import run_fit
from benchmarks.protocol import Protocol, setup_protocol

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn": ("rtn", {}),
    "per_step": ("qdiff", {}),
    "accuquant": ("accuquant", {}),
    "accuquant_block_n2": ("accuquant", {"model": {"final_stage": None},
                                         "data": {"group_size": 2}}),
}
"""Method -> (config suffix, overrides of the config's ``init_args``)."""
CURVE_SEEDS = 256


@dataclass(frozen=True)
class Teacher:
    """One teacher of the main comparison: its folder, configs, conditioning and where its rows go."""

    path: Path
    config_prefix: str
    bits: str
    suffix: str
    conditioning: ConditioningSpec | None = None


TEACHERS = {
    "unet": Teacher(REPO / "models" / "digits-ddpm", "digits_", "w4a8,w8a8,w4a4", ""),
    "dit": Teacher(REPO / "models" / "digits-dit", "digits_dit_", "w8a8,w4a8", "_dit",
                   ConditioningSpec(class_labels=list(range(10)))),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="unet", choices=sorted(TEACHERS),
                   help="unet: models/digits-ddpm with configs/digits_<bits>_*; dit: the class-conditional "
                        "models/digits-dit with configs/digits_dit_<bits>_* (its own JSON and work folder)")
    p.add_argument("--teacher-path", default=None, help="another folder of the teacher's kind (tests)")
    p.add_argument("--bits", default=None, help="comma list of wXaY (default: the teacher's bit widths)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--seeds", default="0,1,2,3", help="calibration seeds (seed_everything and trajectory seed)")
    p.add_argument("--eval-samples", type=int, default=1024)
    p.add_argument("--features", default="inception", help="FID features: inception or random-projection (tests)")
    add_threads_argument(p)
    p.add_argument("--out", default=None, help="default: docs/results/main_comparison[_dit].json")
    p.add_argument("--work-dir", default=None, help="calibration runs, exports and samples "
                                                    "(default: .cache/main_comparison[_dit])")
    p.add_argument("--config-overrides", default=None,
                   help="YAML merged into every run's config (tests shrink the runs with it)")
    return p.parse_args()


def config_of(args: argparse.Namespace, bits: str, method: str) -> Path:
    """The shipped config a row calibrates with."""
    config = REPO / "configs" / f"{TEACHERS[args.teacher].config_prefix}{bits}_{METHODS[method][0]}.yaml"
    if not config.is_file():
        raise SystemExit(f"no config {config.relative_to(REPO)} for bits {bits!r}")
    return config


def calibrate(args: argparse.Namespace, bits: str, method: str, seed: int) -> tuple[Path, float]:
    """Run (or resume, from its last checkpoint) the row's calibration (``launch.run_fit``, resumable); returns the
    export folder and the seconds it took this time."""
    root = Path(args.work_dir) / f"{bits}_{method}_seed{seed}"
    folder, timing = root / "quantized", root / "calibration_seconds.json"
    if (folder / "checksums.json").is_file() and timing.is_file():
        return folder, json.loads(timing.read_text())["seconds"]
    overrides = METHODS[method][1]
    config = config_of(args, bits, method)
    start, load_before = time.time(), os.getloadavg()[0]
    run_fit(config, root, seed, args.threads,
            model={**overrides.get("model", {}), **({"pretrained": args.teacher_path} if args.teacher_path else {})},
            data=overrides.get("data", {}), extra_configs=[args.config_overrides] if args.config_overrides else [],
            resumable=True)
    # A resumed calibration reports the time of its last part only (the checkpoint does not record the rest).
    seconds = time.time() - start
    # The 1-minute load average before and after: a time taken while other jobs shared the cores says so.
    atomic_write_json(timing, {"seconds": seconds, "load_average": max(load_before, os.getloadavg()[0])})
    return folder, seconds


def evaluate(folder: Path, protocol: Protocol, meter: SampleQualityMeter, classifier: DigitClassifier) -> dict[str, Any]:
    """Protocol figures of one exported model (its samples are those of ``Protocol.samples``: the first
    ``CURVE_SEEDS`` come from the error-curve run, the same batches of 64)."""
    unet = load_quantized(folder)
    seeds, reference, steps = protocol.seeds, protocol.reference, protocol.steps
    curve_seeds = seeds[: min(CURVE_SEEDS, len(seeds))]
    curves = paired_errors(protocol.teacher, unet, protocol.scheduler, curve_seeds, steps, cond=protocol.cond,
                           batch_size=PROTOCOL_BATCH_SIZE)
    samples = curves.q_samples
    if len(seeds) > len(curve_seeds):
        with torch.no_grad():
            rest = samples_from(unet, protocol.scheduler, seeds[len(curve_seeds):], steps,
                                batch_size=PROTOCOL_BATCH_SIZE, cond=protocol.cond)
        samples = torch.cat([samples, rest])
    _, figures = protocol.error_row(samples, classifier.labels)
    quality = meter.measure(samples, reference)
    return {**figures, "fid": quality.fid, "fid_fp": quality.fid_fp, "fid2fp32": quality.fid2fp32, "kid": quality.kid,
            "accumulated": curves.accumulated, "per_step": curves.per_step}


def cpu_model() -> str:
    """The CPU the row ran on: rows of one comparison are evidence only when they share it (docs/results.md)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    args = parse_args()
    teacher = TEACHERS[args.teacher]
    args.bits = args.bits or teacher.bits
    args.out = args.out or str(REPO / "docs" / "results" / f"main_comparison{teacher.suffix}.json")
    args.work_dir = args.work_dir or str(REPO / ".cache" / f"main_comparison{teacher.suffix}")
    set_threads(args.threads)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    protocol = setup_protocol(args.teacher_path or str(teacher.path), eval_samples=args.eval_samples,
                              threads=args.threads, conditioning=teacher.conditioning,
                              fp_cache=str(REPO / ".cache" / "protocol" / f"fp_samples{teacher.suffix}.pt"))
    meter = SampleQualityMeter(features=args.features, real_dataset="digits",
                               image_size=protocol.teacher.config.sample_size,
                               features_cache_dir=str(Path(args.work_dir) / "features"))
    classifier = DigitClassifier()
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    rows = record["rows"]
    if rows and rows[0]["threads"] != args.threads:
        raise SystemExit(f"{out} was measured with {rows[0]['threads']} threads; rerun with --threads {rows[0]['threads']}")
    done = {(r["bits"], r["method"], r["seed"]) for r in rows}
    for bits in args.bits.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in methods:
                if (bits, method, seed) in done:
                    continue
                folder, seconds = calibrate(args, bits, method, seed)
                load = json.loads((folder.parent / "calibration_seconds.json").read_text()).get("load_average")
                set_threads(args.threads)
                figures = evaluate(folder, protocol, meter, classifier)
                rows.append({"bits": bits, "method": method, "seed": seed, "threads": args.threads, "cpu": cpu_model(),
                             "calibration_seconds": seconds, "load_average": load, **figures})
                print(f"{bits} {method} seed {seed}: mean {figures['mean']:.5f} median {figures['median']:.6f} "
                      f"digit changed {figures['label_change_share']:.3f} FID {figures['fid']:.2f} "
                      f"FID2FP32 {figures['fid2fp32']:.2f} ({seconds:.0f} s calibration)", flush=True)
                atomic_write_json(out, {"protocol": {"first_seed": PROTOCOL_FIRST_SEED, "samples": len(protocol.seeds),
                                                     "batch_size": PROTOCOL_BATCH_SIZE, "features": args.features},
                                        "rows": rows})


if __name__ == "__main__":
    main()
