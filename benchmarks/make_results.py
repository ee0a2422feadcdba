"""Writes docs/results.md from the JSON rows of benchmarks/quality.py: FID columns, ablations and error plots.

    python benchmarks/make_results.py            # after the quality.py runs of benchmarks/run_all.sh

Every figure comes from files in docs/results/ (pixel errors, timings) and from the final samples that
quality.py kept under .cache/quality_samples (FID, FID2FP32, KID, noise floor: real Inception features).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accuquant_pl.calibration.module import BlockReconstruction  # noqa: E402
from accuquant_pl.data.trajectories import TrajectoryDataModule  # noqa: E402
from accuquant_pl.diffusion.loading import load_unet  # noqa: E402
from accuquant_pl.evaluation.digit_classifier import DigitClassifier  # noqa: E402
from accuquant_pl.evaluation.paired import samples_from  # noqa: E402
from accuquant_pl.evaluation.plots import plot_error_curves  # noqa: E402
from accuquant_pl.evaluation.quality import SampleQualityMeter, real_images  # noqa: E402
from accuquant_pl.io import atomic_write_text  # noqa: E402
from benchmarks.make_protocol_results import protocol_section  # noqa: E402

# rows record a knob only when it was overridden; the rest ran with BlockReconstruction's defaults
DEFAULTS = {k: v.default for k, v in inspect.signature(BlockReconstruction.__init__).parameters.items()}

TABLES = {
    "quality": "Earlier main comparison (128 seeds, one activation range per tensor; equal iteration budget: {iters} "
               "iterations per unit for every method; the robust protocol's is at the end of this page)",
    "ablation_group_size": "AccuQuant group-size ablation (W4A8; state target n = 1 here, n = 4 in the main table; block-output target n = 2, 4, 8 in the objective-variant table)",
    "ablation_gradient": "AccuQuant gradient-mode ablation (W4A8, state target, n = 4; `checkpointed`, whose gradient `exact` equals, is in the main table)",
    "per_step_100_iters": "Per-step baseline at 2x the iterations (100 per unit): about AccuQuant n = 2's compute",
    "final_stage": "Whole-model final stage after the units (200 stage iterations: every activation step size and "
                   "quantized-layer bias trained on the n-step state objective, approx gradient; n is the method's "
                   "group size, 1 for per-step, unless the row names the stage's own n)",
    "iters200": "Per-step and AccuQuant (block output, n = 2) at 4x the iterations (200 per unit, W4A8, lr rounding 0.01)",
    "sensitivity": "Sensitivity to the AdaRound regulariser weight and rounding learning rate (W4A8)",
    "ablation_objective": "AccuQuant objective variants and calibration-seed spread (W4A8, lr rounding 0.01; "
                          "`seed` draws other calibration trajectories, the evaluation seeds stay the same)",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(REPO / "docs" / "results"))
    p.add_argument("--teacher", default=str(REPO / "models" / "digits-ddpm"))
    p.add_argument("--features", default="inception")
    p.add_argument("--features-cache", default=str(REPO / ".cache" / "sample_features"),
                   help="on-disk cache of every sample set's features, keyed by its bytes: a rerun extracts "
                        "features only for the rows whose samples changed ('' to disable)")
    p.add_argument("--noise-floor-offset", type=int, default=10_000_000)
    p.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    return p.parse_args()


def load_runs(folder: Path) -> dict[str, list[dict]]:
    """Rows per table; ``quality`` gathers every quality*.json (the runs may be split by bit width)."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        table = next((t for t in TABLES if path.stem.startswith(t)), path.stem)
        if table not in TABLES:
            continue
        data = json.loads(path.read_text())
        rows = runs.setdefault(table, [])
        for row in data["rows"]:
            if row["method"] == "fp" and any(r["method"] == "fp" for r in rows):
                continue
            rows.append({**row, "settings": data["settings"], "threads": data["torch_threads"]})
    return runs


def method_label(r: dict, with_seed: bool = True) -> str:
    """The method with what distinguishes its run: AccuQuant's rollout target and loss weights, the seed."""
    label = r["method"]
    if r["method"] == "accuquant":
        extra = [r.get("rollout_target") or "state"]
        if (r.get("state_loss_weight"), r.get("block_loss_weight")) not in ((None, None), (1.0, 0.0)):
            extra.append(f"state x{r['state_loss_weight']:g} + block x{r['block_loss_weight']:g}")
        label += f" ({', '.join(extra)})"
    if r.get("later_units") not in (None, "fp"):
        label += f", later units {r['later_units']}"
    if r.get("start_weighting") not in (None, "uniform"):
        label += f", {r['start_weighting']} starts"
    if (r.get("starts_per_batch") or 1) != 1:
        label += f", {r['starts_per_batch']} starts/batch"
    if r.get("final_stage_iters"):
        label += f", final stage {r['final_stage_iters']} it"
        if r.get("final_stage_group_size") not in (None, r.get("n") or 1):
            label += f" n={r['final_stage_group_size']}"
    seed = r["settings"].get("seed", 0)  # the calibration seed: FP and RTN rows do not depend on it
    return label + (f", seed {seed}" if with_seed and seed and r["method"] not in ("fp", "rtn") else "")


def seed_summary(measured: list[tuple[dict, float]]) -> list[str]:
    """Mean and spread over calibration seeds of every configuration run with at least three seeds.

    ``measured`` holds (row, FID2FP32) for every table row; rows that differ only in ``seed`` form one
    configuration (a row listed in two tables counts once)."""
    groups: dict[tuple, dict[int, tuple[dict, float]]] = {}
    for r, fid2fp in measured:
        if r["method"] in ("fp", "rtn"):
            continue
        s = r["settings"]
        key = (r["bits"], method_label(r, with_seed=False), r["n"] or "-", r["gradient"] or "-", s["iters"],
               r.get("rounding_weight") or DEFAULTS["rounding_weight"], r.get("lr_adaround") or DEFAULTS["lr_adaround"])
        groups.setdefault(key, {})[s.get("seed", 0)] = (r, fid2fp)
    lines = []
    for key, by_seed in groups.items():
        if len(by_seed) < 3:
            continue
        mse = torch.tensor([r["final_mse"] for r, _ in by_seed.values()], dtype=torch.float64)
        fid = torch.tensor([f for _, f in by_seed.values()], dtype=torch.float64)
        lines.append("| " + " | ".join(str(k) for k in key) + f" | {','.join(str(s) for s in sorted(by_seed))} | "
                     f"{mse.mean():.5f} ± {mse.std():.5f} | {mse.min():.5f} .. {mse.max():.5f} | "
                     f"{fid.mean():.2f} ± {fid.std():.2f} |")
    if not lines:
        return []
    return ["## Mean over calibration seeds", "",
            "Configurations run with several calibration seeds (rows of the tables above; ± is the sample standard "
            "deviation over seeds).", "",
            "| bits | method | n | gradient | it/unit | rounding weight | lr rounding | seeds | final MSE vs FP | "
            "min .. max | FID2FP32 |", "|---|---|---|---|---|---|---|---|---|---|---|", *lines, ""]


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main() -> None:
    args = parse_args()
    folder = Path(args.results)
    runs = load_runs(folder)
    if "quality" not in runs:
        raise SystemExit(f"no quality*.json in {folder}: run benchmarks/quality.py first (see benchmarks/run_all.sh)")
    settings = runs["quality"][0]["settings"]
    seeds = list(range(settings["eval_first_seed"], settings["eval_first_seed"] + settings["eval_samples"]))
    fp_row = next(r for r in runs["quality"] if r["method"] == "fp")
    fp = torch.load(fp_row["samples_file"], weights_only=True)
    if fp["seeds"] != seeds:
        raise SystemExit("the FP samples were drawn from other seeds than the settings say; rerun quality.py")
    teacher = load_unet(args.teacher)
    scheduler = TrajectoryDataModule(teacher=args.teacher, num_inference_steps=settings["steps"]).make_scheduler()
    fp_other = samples_from(teacher, scheduler, [s + args.noise_floor_offset for s in seeds], settings["steps"])
    meter = SampleQualityMeter(args.features, "digits", fp["samples"].shape[-1], kid=True,
                               features_cache_dir=args.features_cache or None)
    floor = meter.measure(fp["samples"], fp["samples"], fp_other)
    real = real_images("digits", fp["samples"].shape[-1])
    real_confidence = DigitClassifier().score(real).confidence
    lines = ["# Results on the shipped digits teacher", "",
             "Generated by `bash benchmarks/run_all.sh` (calibrations, ~5 h on 2 CPU cores) whose last step is "
             "`python benchmarks/make_results.py` (this page). Samples: "
             f"{len(seeds)} held-out seeds ({seeds[0]}..{seeds[-1]}, never used to calibrate), DDIM "
             f"{settings['steps']} steps; calibration: {settings['num_trajectories']} FP trajectories, batch "
             f"{settings['batch_size']}. FID/KID use the standard FID Inception-v3 (docs/inception.md) against the "
             f"{len(real)} held-out real digits; FID2FP32 is FID against the FP samples from the same noises. "
             "At this sample count FID is strongly biased upwards: compare rows with each other and with the "
             f"noise floor (FID between two disjoint FP sets of {len(seeds)} samples: **{floor.noise_floor:.2f}**; "
             f"FP vs real: FID {floor.fid:.2f}). Digit confidence: mean max-probability of a logistic-regression "
             f"digit classifier on the samples (real held-out digits: {real_confidence:.3f}). "
             "Calibration time is wall-clock "
             "with the thread count shown, measured while other work shared the machine: indicative only.", ""]
    curves: dict[str, tuple[list[float], list[float]]] = {}
    measured: list[tuple[dict, float]] = []
    for table, title in TABLES.items():
        rows = runs.get(table)
        if not rows:
            continue
        lines += [f"## {title.format(iters=rows[0]['settings']['iters'])}", "",
                  "| bits | method | n | gradient | it/unit | rounding weight | lr rounding | final MSE vs FP | PSNR (dB) | "
                  "FID2FP32 | FID | KID | digit conf. | calib (s) | threads |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            samples = torch.load(r["samples_file"], weights_only=True)
            if samples["seeds"] != seeds:
                raise SystemExit(f"{r['samples_file']} holds other seeds than the FP reference")
            q = meter.measure(samples["samples"], fp["samples"])
            measured.append((r, q.fid2fp32))
            it = "-" if r["method"] in ("fp", "rtn") else r["settings"]["iters"]
            rw, lr = (r.get("rounding_weight") or DEFAULTS["rounding_weight"],
                      r.get("lr_adaround") or DEFAULTS["lr_adaround"]) if it != "-" else ("-", "-")
            lines.append(f"| {r['bits']} | {method_label(r)} | {r['n'] or '-'} | {r['gradient'] or '-'} | {it} | {rw} | {lr} | "
                         f"{r['final_mse']:.5f} | {fmt(r['final_psnr'])} | {fmt(q.fid2fp32)} | {fmt(q.fid)} | "
                         f"{fmt(q.kid, 4)} | {r['confidence']:.3f} | {r['calib_seconds']:.0f} | {r['threads']} |")
            if table == "quality" and r["bits"] == "w4a8" and r["method"] != "fp":
                label = r["method"] if r["method"] != "accuquant" else f"accuquant n={r['n']} {r['gradient']}"
                curves[label] = (r["per_step"], r["accumulated"])
        lines.append("")
    lines += seed_summary(measured)
    if curves:
        plot_error_curves(curves, folder / "error_curves_w4a8.png",
                          title="W4A8 digits teacher: per-step vs accumulated error (same noises)")
        lines += ["## Error accumulation (W4A8)", "",
                  "Dashed (left): error of the model output on the FP state at each step, the quantity per-step "
                  "calibration fits. Solid (right): distance of the quantized sampler's own state to the FP state "
                  "after each step, the quantity AccuQuant fits over n steps.", "",
                  "![W4A8 error accumulation](results/error_curves_w4a8.png)", ""]
    lines += protocol_section(folder)  # benchmarks/make_protocol_results.py: core ablation and peers
    atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
