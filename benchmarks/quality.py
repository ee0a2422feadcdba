"""Quality of RTN, the per-step baseline and AccuQuant on the shipped digits teacher, at equal iteration budgets.

Prints the pixel-space error of final samples against FP samples from the same noise (held-out seeds that
calibration never saw), plus the digit-classifier view of the samples, and writes JSON for docs/results.md.

    python benchmarks/quality.py                     # W8A8, W4A8, W4A4 x {rtn, per_step, accuquant}
    python benchmarks/quality.py --bits w4a8 --methods accuquant --group-sizes 1,2,4,8   # group-size ablation
    python benchmarks/quality.py --bits w4a8 --methods accuquant --gradients exact,checkpointed,approx,stepwise
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accuquant_pl.calibration import Ablations, BlockReconstruction, FinalStage, Rounding  # noqa: E402
from accuquant_pl.data.trajectories import TrajectoryAblations, TrajectoryDataModule  # noqa: E402
from accuquant_pl.diffusion.loading import load_unet  # noqa: E402
from accuquant_pl.evaluation.digit_classifier import DigitClassifier  # noqa: E402
from accuquant_pl.evaluation.paired import paired_errors, samples_from  # noqa: E402
from accuquant_pl.io import atomic_torch_save, atomic_write_json  # noqa: E402
from accuquant_pl.quant import QuantSpec  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(REPO / "models" / "digits-ddpm"))
    p.add_argument("--bits", default="w8a8,w4a8,w4a4", help="comma list of wXaY")
    p.add_argument("--methods", default="rtn,per_step,accuquant", help="comma list of rtn, per_step, accuquant")
    p.add_argument("--group-sizes", default="4", help="AccuQuant group sizes n (one row each)")
    p.add_argument("--gradients", default="checkpointed", help="AccuQuant gradient modes (one row each)")
    p.add_argument("--rollout-target", default="state", choices=("state", "block_output", "block_accumulated"),
                   help="what AccuQuant matches along its rollout (block_output needs --gradients stepwise)")
    p.add_argument("--state-loss-weight", type=float, default=1.0, help="weight of the AccuQuant state loss")
    p.add_argument("--block-loss-weight", type=float, default=0.0,
                   help="weight of the per-step block-output term on the group's FP states added to AccuQuant")
    p.add_argument("--later-units", default="fp", choices=("fp", "quantized"),
                   help="units after the calibrated one during calibration: FP or quantized with initial parameters")
    p.add_argument("--start-weighting", default="uniform", choices=("uniform", "linear"),
                   help="how group starts are drawn (the data module's start_weighting)")
    p.add_argument("--starts-per-batch", type=int, default=1,
                   help="group starts (timesteps) mixed in every batch (the data module's starts_per_batch)")
    p.add_argument("--final-stage-iters", type=int, default=0,
                   help="iterations of the whole-model final stage after the units (BlockReconstruction's "
                        "final_stage_iterations; its n is --final-stage-group-size)")
    p.add_argument("--final-stage-group-size", type=int, default=None,
                   help="n of the final stage's rollouts (BlockReconstruction's final_stage_group_size; default: "
                        "the method's group size, 1 for per_step)")
    p.add_argument("--iters", type=int, default=50, help="iterations per reconstruction unit (all methods)")
    p.add_argument("--rounding-weight", type=float, default=None,
                   help="AdaRound regulariser weight (default: BlockReconstruction's)")
    p.add_argument("--lr-adaround", type=float, default=None,
                   help="Adam learning rate of the rounding variables (default: BlockReconstruction's)")
    p.add_argument("--num-trajectories", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (calibration and evaluation)")
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--eval-first-seed", type=int, default=100_000, help="held-out seeds: disjoint from calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "quality.json"))
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "trajectories"))
    p.add_argument("--samples-dir", default=str(REPO / ".cache" / "quality_samples"),
                   help="final samples of every row (.pt), read by make_results.py for FID")
    return p.parse_args()


def calibrate(args: argparse.Namespace, bits: str, method: str, n: int, gradient: str) -> torch.nn.Module:
    w, a = (int(v) for v in bits[1:].split("a"))
    L.seed_everything(args.seed, verbose=False)
    dm = TrajectoryDataModule(teacher=args.teacher, num_inference_steps=args.steps,
                              num_trajectories=args.num_trajectories, seed=args.seed, batch_size=args.batch_size,
                              group_size=n, cache_dir=args.cache_dir,
                              starts_per_batch=args.starts_per_batch,
                              group_ablations=TrajectoryAblations(start_weighting=args.start_weighting))
    quant = QuantSpec(weight_bits=w, act_bits=a, adaround=method != "rtn")
    if method == "rtn":  # RTN takes none of the optimisation settings
        module = BlockReconstruction(pretrained=args.teacher, quant=quant, objective="rtn")
    else:
        accuquant = {"gradient": gradient, "rollout_target": args.rollout_target} if method == "accuquant" else {}
        weights = ({"state_loss_weight": args.state_loss_weight, "block_loss_weight": args.block_loss_weight}
                   if method == "accuquant" else {})
        stage = (FinalStage(iterations=args.final_stage_iters, group_size=args.final_stage_group_size)
                 if args.final_stage_iters else None)
        module = BlockReconstruction(
            pretrained=args.teacher, quant=quant, objective=method, iterations_per_unit=args.iters, final_stage=stage,
            ablations=Ablations(later_units=args.later_units, **weights), **accuquant,
            rounding=Rounding(weight=args.rounding_weight) if args.rounding_weight is not None else None,
            **({"lr_adaround": args.lr_adaround} if args.lr_adaround is not None else {}))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, dm)
    return module.finalize()


def save_samples(folder: Path, name: str, samples: torch.Tensor, seeds: list[int]) -> str:
    """Keep a row's final samples (with their seeds) so FID can be computed later without resampling."""
    path = folder / f"{name}.pt"
    atomic_torch_save({"samples": samples, "seeds": seeds}, path)
    return str(path)


def main() -> None:
    args = parse_args()
    teacher = load_unet(args.teacher)
    dm = TrajectoryDataModule(teacher=args.teacher, num_inference_steps=args.steps)
    scheduler = dm.make_scheduler()
    seeds = list(range(args.eval_first_seed, args.eval_first_seed + args.eval_samples))
    classifier = DigitClassifier()
    samples_dir = Path(args.samples_dir)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir", "teacher")}
    fp_samples = samples_from(teacher, scheduler, seeds, args.steps)
    rows = [{"bits": "fp32", "method": "fp", "n": None, "gradient": None, "final_mse": 0.0, "final_psnr": None,
             "calib_seconds": 0.0, "samples_file": save_samples(samples_dir, "fp", fp_samples, seeds),
             **classifier.score(fp_samples).as_dict()}]
    runs = []
    for bits in args.bits.split(","):
        for method in args.methods.split(","):
            if method == "accuquant":
                runs += [(bits, method, int(n), g) for n in args.group_sizes.split(",") for g in args.gradients.split(",")]
            else:
                runs.append((bits, method, 1, "exact"))
    for bits, method, n, gradient in runs:
        start = time.time()
        student = calibrate(args, bits, method, n, gradient)
        seconds = time.time() - start
        errors = paired_errors(teacher, student, scheduler, seeds, args.steps)
        quality = classifier.score(errors.q_samples).as_dict()
        aq = method == "accuquant"
        target = f"_{args.rollout_target}" if aq and args.rollout_target != "state" else ""
        if aq and (args.state_loss_weight, args.block_loss_weight) != (1.0, 0.0):
            target += f"_ws{args.state_loss_weight:g}_wb{args.block_loss_weight:g}"
        if method != "rtn" and args.later_units != "fp":
            target += f"_later{args.later_units}"
        if method != "rtn" and args.start_weighting != "uniform":
            target += f"_starts{args.start_weighting}"
        if method != "rtn" and args.starts_per_batch != 1:
            target += f"_mix{args.starts_per_batch}"
        if method != "rtn" and args.final_stage_iters:
            target += f"_final{args.final_stage_iters}"
            if args.final_stage_group_size is not None:
                target += f"n{args.final_stage_group_size}"
        row = {"bits": bits, "method": method, "n": n if aq else None,
               "gradient": gradient if aq else None, "rollout_target": args.rollout_target if aq else None,
               "state_loss_weight": args.state_loss_weight if aq else None,
               "block_loss_weight": args.block_loss_weight if aq else None,
               "later_units": args.later_units if method != "rtn" else None,
               "start_weighting": args.start_weighting if method != "rtn" else None,
               "starts_per_batch": args.starts_per_batch if method != "rtn" else None,
               "final_stage_iters": args.final_stage_iters if method != "rtn" else None,
               "final_stage_group_size": (args.final_stage_group_size or n)
               if method != "rtn" and args.final_stage_iters else None,
               "final_mse": errors.final_mse,
               "final_psnr": errors.final_psnr, "calib_seconds": seconds, **quality,
               "per_step": errors.per_step, "accumulated": errors.accumulated,
               "rounding_weight": args.rounding_weight, "lr_adaround": args.lr_adaround,
               "samples_file": save_samples(samples_dir, f"{bits}_{method}{target}_n{n}_{gradient}_it{args.iters}"
                                            f"_rw{args.rounding_weight}_lr{args.lr_adaround}"
                                            f"{f'_seed{args.seed}' if args.seed else ''}",
                                            errors.q_samples, seeds)}
        rows.append(row)
        print(f"{bits} {method}{target} n={n} {gradient}: final MSE {errors.final_mse:.5f} PSNR {errors.final_psnr:.2f} dB "
              f"({seconds:.0f} s)", flush=True)
        # written after every row, so an interrupted sweep keeps what it measured
        atomic_write_json(args.out, {"settings": settings, "torch_threads": torch.get_num_threads(), "rows": rows})
    print("\n| bits | method | n | gradient | final MSE vs FP | PSNR (dB) | digit confidence | calib time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        psnr = f"{r['final_psnr']:.2f}" if r["final_psnr"] else "-"
        print(f"| {r['bits']} | {r['method']} | {r['n'] or '-'} | {r['gradient'] or '-'} | {r['final_mse']:.5f} | "
              f"{psnr} | {r['confidence']:.3f} | {r['calib_seconds']:.0f} |")


if __name__ == "__main__":
    main()
