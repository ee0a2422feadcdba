"""Round-to-nearest core ablation on the shipped digits teacher: one row per quantization-core choice.

Every row is RTN (weights rounded to nearest on their MSE grid, activation ranges from the FP calibration
trajectories, no optimisation) at W8A8, W4A8 and W4A4, evaluated on the robust protocol
(``accuquant_pl.metrics.sample_errors``): the FP and quantized samplers start from the same noises of
``--eval-samples`` held-out seeds, sampled in batches of ``PROTOCOL_BATCH_SIZE``; per-sample final MSE vs FP
(mean with a bootstrap 95 % interval, median, p90, p99, share above 0.01) and the share of samples whose digit
(the shipped classifier's reading) changes. Rows are written to the JSON after each one, and a rerun skips the
rows the JSON already holds, so an interrupted sweep continues.

    OMP_NUM_THREADS=1 python -m benchmarks.core_ablation [--bits w8a8,w4a8,w4a4] [--rows default,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

from accuquant_pl.evaluation.digit_classifier import DigitClassifier
from accuquant_pl.io import atomic_write_json
from accuquant_pl.metrics.sample_errors import (
    PROTOCOL_BATCH_SIZE,
    PROTOCOL_FIRST_SEED,
)
from accuquant_pl.quant import QuantSpec, rtn_quantize
from benchmarks.common import REPO, add_threads_argument
from benchmarks.protocol import FP_CACHE, TRAJECTORY_CACHE, setup_protocol

FIRST_LAST = ("conv_in", "conv_out")

BASE_ROW = "base: one activation range (earlier default)"
BASE_SPEC: dict[str, Any] = {"act_timestep_groups": 1}
"""Every row departs from this: the default ``QuantSpec`` with one activation range for all timesteps (the
default before this ablation chose timestep groups), so that the rows measured before the change stay comparable."""
CORE_CHOICES: dict[str, dict[str, Any]] = {
    BASE_ROW: {},
    "first/last layers FP": {"first_last_bits": 16},
    "first/last layers at the base bits": {"first_last_bits": None},
    "first/last weights FP (acts 8-bit)": {"overrides": [{"pattern": p, "weight_bits": 16} for p in FIRST_LAST]},
    "first/last activations FP (weights 8-bit)": {"overrides": [{"pattern": p, "act_bits": 16} for p in FIRST_LAST]},
    "network input FP (input_bits 16)": {"input_bits": 16},
    "activation init minmax": {"act_init": "minmax"},
    "activation init mse": {"act_init": "mse"},
    "attention act-act matmuls not quantized": {"quantize_attention_matmuls": False},
    "skip concat one range (no split)": {"split_skip": False},
    "symmetric weights": {"weight_symmetric": True},
    "symmetric activations": {"act_symmetric": True},
    "per-tensor weights": {"weight_per_channel": False},
    "timestep-grouped act ranges (4 groups, now the default)": {"act_timestep_groups": 4},
    "timestep-grouped act ranges (10 groups)": {"act_timestep_groups": 10},
}
"""Each row's departure from ``BASE_SPEC`` (which is what the first row runs)."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(REPO / "models" / "digits-ddpm"))
    p.add_argument("--bits", default="w8a8,w4a8,w4a4", help="comma list of wXaY")
    p.add_argument("--rows", default=",".join(CORE_CHOICES), help="comma list of row names (see CORE_CHOICES)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--num-trajectories", type=int, default=64, help="FP calibration trajectories (seed 0..)")
    p.add_argument("--act-calibration-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=1024)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "core_ablation.json"))
    p.add_argument("--cache-dir", default=TRAJECTORY_CACHE)
    p.add_argument("--fp-samples", default=FP_CACHE)
    add_threads_argument(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    unknown = [r for r in args.rows.split(",") if r not in CORE_CHOICES]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(CORE_CHOICES)}")
    protocol = setup_protocol(args.teacher, args.eval_samples, args.steps, args.num_trajectories, args.threads,
                              args.cache_dir, args.fp_samples)
    batches = protocol.calibration_batches(args.act_calibration_samples)
    classifier = DigitClassifier()
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["bits"], r["row"]) for r in rows}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir", "fp_samples", "teacher")}
    if rows and rows[0].get("threads", args.threads) != args.threads:
        raise SystemExit(f"{out} was measured with {rows[0]['threads']} threads; rerun with --threads {rows[0]['threads']}")
    for bits in args.bits.split(","):
        w, a = (int(v) for v in bits[1:].split("a"))
        for name in args.rows.split(","):
            if (bits, name) in done:
                continue
            spec = QuantSpec(weight_bits=w, act_bits=a, **{**BASE_SPEC, **copy.deepcopy(CORE_CHOICES[name])})
            start = time.time()
            student = rtn_quantize(copy.deepcopy(protocol.teacher), spec, batches,
                                   protocol.scheduler.config.num_train_timesteps).eval()
            q = protocol.samples(student)
            stats, figures = protocol.error_row(q, classifier.labels)
            rows.append({"bits": bits, "row": name, "threads": args.threads, "spec": spec.to_dict(), **figures,
                         "seconds": time.time() - start})
            print(f"{bits} {name}: mean {stats.mean:.5f} [{stats.mean_ci95[0]:.5f}, {stats.mean_ci95[1]:.5f}] "
                  f"median {stats.median:.6f} p99 {stats.p99:.4f} >0.01 {stats.share_above:.3f} "
                  f"digit changed {stats.label_change_share:.3f}", flush=True)
            atomic_write_json(out, {"settings": settings, "protocol": {"first_seed": PROTOCOL_FIRST_SEED,
                                    "batch_size": PROTOCOL_BATCH_SIZE}, "rows": rows})
    print(markdown_table(rows))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The ablation as a markdown table (docs/results.md)."""
    lines = ["| bits | core choice | mean final MSE [95 % CI] | median | p99 | share > 0.01 | digit changed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["mean_ci95"]
        lines.append(f"| {r['bits'].upper()} | {r['row']} | {r['mean']:.5f} [{lo:.5f}, {hi:.5f}] | "
                     f"{r['median']:.6f} | {r['p99']:.4f} | {100 * r['share_above']:.1f} % | "
                     f"{100 * r['label_change_share']:.1f} % |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
