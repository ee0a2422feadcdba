"""Fingerprint of what the code computes, for refactors that must not change it (the layout redesign, issue 17).

Calibrates the shipped digits teacher three times through ``main.py fit`` (RTN W4A8, per-step W4A8 and AccuQuant
W4A8 with its final stage cut to 20 iterations; calibration seed 0), samples 256 held-out protocol seeds with
each export in batches of 64 and records the mean final MSE against the FP samples (full precision) and the
SHA-256 of the samples' bytes. ``--check`` compares a new fingerprint with a recorded one and exits 1 on any
difference, naming the run: the refactor reproduces the calibration bit for bit or it changed behaviour.

    python -m benchmarks.behaviour_fingerprint --threads 2 --out docs/results/behaviour_fingerprint.json
    python -m benchmarks.behaviour_fingerprint --threads 2 --out /tmp/after.json \
        --check docs/results/behaviour_fingerprint.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from accuquant_pl.deploy import load_quantized
from benchmarks.common import REPO, add_threads_argument, set_threads
from benchmarks.launch import run_fit
from benchmarks.protocol import setup_protocol

RUNS = {
    "rtn_w4a8": ("configs/digits_w4a8_rtn.yaml", {}),
    "per_step_w4a8": ("configs/digits_w4a8_qdiff.yaml", {}),
    "accuquant_w4a8_short": ("configs/digits_w4a8_accuquant.yaml", {"final_stage": {"iterations": 20}}),
}
"""Run name -> (shipped config, overrides of its model ``init_args``)."""
SAMPLES = 256


def calibrate(config: str, model_overrides: dict, root: Path, threads: int) -> Path:
    """``main.py fit`` of ``config`` (seed 0) into ``root``, not resumable (no checkpoint callback); returns the
    export folder."""
    return run_fit(REPO / config, root, seed=0, threads=threads, model=model_overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_threads_argument(p, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default=str(REPO / ".cache" / "behaviour_fingerprint"))
    p.add_argument("--check", default=None, help="a recorded fingerprint this one must equal")
    args = p.parse_args()
    protocol = setup_protocol(eval_samples=SAMPLES, threads=args.threads, fp_cache=None)
    rows = {"threads": args.threads, "fp_sha256": hashlib.sha256(protocol.reference.numpy().tobytes()).hexdigest()}
    for name, (config, overrides) in RUNS.items():
        folder = calibrate(config, overrides, Path(args.work_dir) / name, args.threads)
        set_threads(args.threads)
        samples = protocol.samples(load_quantized(folder))
        mse = (samples - protocol.reference).pow(2).flatten(1).mean(1).mean().item()
        rows[name] = {"mean_mse": repr(mse), "samples_sha256": hashlib.sha256(samples.numpy().tobytes()).hexdigest()}
        print(name, rows[name], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    if args.check:
        recorded = json.loads(Path(args.check).read_text())
        changed = [k for k in recorded if recorded[k] != rows.get(k)]
        if changed:
            raise SystemExit(f"behaviour changed against {args.check}: {changed}")
        print(f"bit for bit equal to {args.check}")


if __name__ == "__main__":
    main()
