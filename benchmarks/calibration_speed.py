"""Calibration speed and memory of the shipped W4A8 AccuQuant configs: seconds per unit iteration and per final-stage
step, and peak resident memory, for each teacher and thread count; optionally against another commit in the same
sweep (issue 33).

Every row is its own process (so its peak RSS is its own): ``main.py``'s CLI builds the shipped config's module and
data module (`--threads`, shortened epochs), ``trainer.fit`` runs every unit for ``--unit-iters`` iterations and
the final stage for ``--stage-iters`` steps, with no logger, checkpoint, FID or export callback. The times are the
mean over the epochs' steps after the first step of each epoch (warm-up excluded), measured by a callback around
Lightning's batch hooks (the trajectory cache, built by the first row, is outside them). ``--baseline COMMIT`` also measures
that commit's code (a ``git worktree`` in ``.cache/calibration_speed``), row by row in the same sweep, and prints
the ratio: the speed claims of docs/PERFORMANCE.md are such ratios. ``--variant NAME=ARGS`` adds rows of the current
code with further ``main.py fit`` arguments (an option against the shipped config, in the same sweep).

    python -m benchmarks.calibration_speed --teachers unet,dit --threads 1,2 --baseline 2b51bb5 \
        --variant "recompute=--model.init_args.final_stage.recompute=true" [--out FILE.json]
    python -m benchmarks.calibration_speed --teachers unet --threads 1 --profile --baseline 2b51bb5
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# REPO, the VmHWM reading and the rows' thread environment restate benchmarks/common.py on purpose: a row runs
# against a baseline commit's code (PYTHONPATH), whose benchmarks package may have no common.py.
REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"unet": "configs/digits_w4a8_accuquant.yaml", "dit": "configs/digits_dit_w4a8_accuquant.yaml"}
WORKTREES = REPO / ".cache" / "calibration_speed"


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


SHARES = {
    "convolution (forward + backward)": ("aten::mkldnn_convolution", "aten::convolution_backward",
                                         "FrozenWeightConv2d", "FrozenWeightConv2dBackward"),
    "attention and linear matmuls": ("aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                     "aten::addmm", "aten::mm"),
    "elementwise fake-quant arithmetic, its gradients, casts, copies": (
        "aten::mul", "aten::add", "aten::sub", "aten::where", "aten::ge", "aten::le", "aten::clamp", "aten::round",
        "aten::_to_copy", "aten::copy_", "aten::index", "aten::sum", "aten::pow", "aten::div", "aten::reciprocal",
        "aten::clamp_min", "aten::neg", "aten::index_put_", "aten::bucketize", "aten::eq", "aten::sum_to_size",
        "FakeQuantizeLSQ", "FakeQuantizeLSQBackward"),
    "group norm, SiLU, concatenation": ("aten::silu", "aten::native_group_norm", "aten::native_group_norm_backward",
                                        "aten::silu_backward", "aten::cat"),
}
"""Profile categories: aten ops by name (their self CPU time); the rest is "other ops", and wall time minus all
ops' self time is "outside ops" (Python, the autograd engine's bookkeeping, Lightning's loop)."""


def _shares(events, wall: float) -> dict[str, float]:
    self_s = {e.key: e.self_cpu_time_total / 1e6 for e in events}
    total = sum(self_s.values())
    shares = {name: sum(self_s.get(op, 0.0) for op in ops) / wall for name, ops in SHARES.items()}
    shares["other ops"] = (total - sum(v * wall for v in shares.values())) / wall
    shares["outside ops (Python, autograd engine, Lightning)"] = (wall - total) / wall
    return shares


def measure_row(config: str, threads: int, unit_iters: int, stage_iters: int, profile: bool = False,
                options: Sequence[str] = ()) -> dict:
    """One row, in this process: only the CLI entry point (``accuquant_pl.cli.main``) is used, which every commit
    since the layout redesign has, so the same function measures a baseline worktree's code. ``options`` are
    further ``main.py fit`` arguments (a variant's settings)."""
    import lightning as L
    import torch

    from accuquant_pl.cli import main

    after_imports = _rss_mb()  # torch, Lightning (and what it imports), diffusers: before any model exists
    torch.set_num_threads(threads)

    class StepTimes(L.Callback):
        def __init__(self) -> None:
            self.times: dict[int, list[float]] = {}
            self._t = 0.0
            self.profiles: dict[str, dict[str, float]] = {}
            self._profiler = None

        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            # Profiled: the middle unit and the final stage (the epoch after the last unit).
            e, units = trainer.current_epoch, len(pl_module.unit_names)
            if profile and e in (units // 2, units):
                self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self._profiler.__enter__()
                self._epoch_start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            if self._profiler is not None:
                wall = time.perf_counter() - self._epoch_start
                self._profiler.__exit__(None, None, None)
                kind = "final stage" if trainer.current_epoch == len(pl_module.unit_names) else "unit"
                self.profiles[kind] = _shares(self._profiler.key_averages(), wall)
                self._profiler = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.times.setdefault(trainer.current_epoch, []).append(time.perf_counter() - self._t)

    cli = main(["--config", str(Path.cwd() / config), "--model.init_args.iterations_per_unit", str(unit_iters),
                "--model.init_args.final_stage.iterations", str(stage_iters), "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(WORKTREES / "run"),
                "--data.init_args.cache_dir", str(REPO / ".cache" / "trajectories"), *options], run=False)
    steps = StepTimes()
    cli.trainer.callbacks.append(steps)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    wall = time.perf_counter() - start
    stage = len(cli.model.unit_names)
    unit_steps = [t for e, ts in steps.times.items() if e < stage for t in ts[1:]]
    stage_steps = steps.times.get(stage, [])[1:]
    return {"threads": threads, "units": stage, "s_per_unit_iter": sum(unit_steps) / max(len(unit_steps), 1),
            "s_per_stage_step": sum(stage_steps) / max(len(stage_steps), 1), "fit_wall_s": wall,
            "peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": after_imports,
            **({"profile": steps.profiles} if profile else {})}


def _worktree(commit: str) -> Path:
    folder = WORKTREES / commit
    if not folder.exists():
        WORKTREES.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=REPO, check=True,
                       capture_output=True)
        (folder / "models").mkdir(exist_ok=True)
        for model in (REPO / "models").iterdir():  # the shipped teachers (same files in every commit of the sweep)
            if not (folder / "models" / model.name).exists():
                (folder / "models" / model.name).symlink_to(model)
    return folder


def _run_row(code: Path, teacher: str, threads: int, unit_iters: int, stage_iters: int, profile: bool,
             options: Sequence[str] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    row = {"config": CONFIGS[teacher], "threads": threads, "unit_iters": unit_iters, "stage_iters": stage_iters,
           "profile": profile, "options": list(options)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--row", json.dumps(row)], cwd=code,
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def projected_training_s(config: str, row: dict) -> float:
    """The config's own training time from a row's per-step figures: units x ``iterations_per_unit`` unit iterations
    plus ``final_stage.iterations`` stage steps (the rows run shortened epochs)."""
    import yaml

    args = yaml.safe_load((REPO / config).read_text())["model"]["init_args"]
    stage = (args.get("final_stage") or {}).get("iterations", 0)
    return row["units"] * args["iterations_per_unit"] * row["s_per_unit_iter"] + stage * row["s_per_stage_step"]


def parse_variants(given: Sequence[str]) -> dict[str, list[str]]:
    """``--variant NAME=ARGS`` values -> {name: main.py arguments}, led by the shipped config ("shipped": none)."""
    variants: dict[str, list[str]] = {"shipped": []}
    for v in given:
        name, sep, options = v.partition("=")
        if not sep or not name or name in variants or not options.strip():
            raise SystemExit(f"--variant {v!r}: expected NAME=ARGS with a new NAME and main.py fit arguments")
        variants[name] = shlex.split(options)
    return variants


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--row":  # a row in its own process, in the code's folder
        print(json.dumps(measure_row(**json.loads(sys.argv[2]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="unet,dit", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--threads", default="1,2", help="comma list of torch thread counts, one row each")
    p.add_argument("--unit-iters", type=int, default=10, help="iterations of every unit (shortened)")
    p.add_argument("--stage-iters", type=int, default=10, help="steps of the final stage (shortened)")
    p.add_argument("--baseline", default=None, help="a commit measured row by row in the same sweep")
    p.add_argument("--profile", action="store_true",
                   help="also profile the middle unit and the final stage (torch.profiler; slows the timed steps)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="also measure the current code with these main.py fit arguments (repeatable), e.g. "
                        "'recompute=--model.init_args.final_stage.recompute=true'")
    p.add_argument("--busy", action="store_true",
                   help="run every row beside one other CPU-bound process (a Python busy loop): a busy machine")
    p.add_argument("--out", default=None, help="JSON file of the rows")
    args = p.parse_args()
    teachers = args.teachers.split(",")
    unknown = [t for t in teachers if t not in CONFIGS]
    if unknown:
        raise SystemExit(f"--teachers: unknown {unknown}; choose from {sorted(CONFIGS)}")
    variants = parse_variants(args.variant)
    # (label, code folder, main.py options): the baseline commit runs its shipped config only
    runs = [(name if name != "shipped" else "current", REPO, options) for name, options in variants.items()]
    if args.baseline:
        runs.append((f"baseline {args.baseline}", _worktree(args.baseline), []))
    rows = []
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        _sweep(args, teachers, runs, rows)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    _report(args, runs, rows)


def _sweep(args: argparse.Namespace, teachers: list[str], runs: list, rows: list[dict]) -> None:
    for teacher in teachers:
        for threads in map(int, args.threads.split(",")):
            row = {"teacher": teacher, "threads": threads}
            for label, code, options in runs:
                row[label] = _run_row(code, teacher, threads, args.unit_iters, args.stage_iters, args.profile, options)
            rows.append(row)
            print(json.dumps(row), flush=True)


def _report(args: argparse.Namespace, runs: list, rows: list[dict]) -> None:
    base_label = runs[-1][0] if args.baseline else None
    print("\n| teacher | threads | code | s / unit iter | s / final-stage step | projected training s | peak RSS MB "
          "| RSS after imports MB | stage vs baseline | training vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = row[base_label] if base_label else None
        for label, _, _ in runs:
            r = row[label]
            train = projected_training_s(CONFIGS[row["teacher"]], r)
            ratio = train_ratio = ""
            if base and label != base_label:
                ratio = f"{base['s_per_stage_step'] / r['s_per_stage_step']:.2f}x"
                train_ratio = f"{projected_training_s(CONFIGS[row['teacher']], base) / train:.2f}x"
            print(f"| {row['teacher']} | {row['threads']} | {label} | {r['s_per_unit_iter']:.3f} | "
                  f"{r['s_per_stage_step']:.3f} | {train:.0f} | {r['peak_rss_mb']:.0f} | "
                  f"{r.get('rss_after_imports_mb', float('nan')):.0f} | {ratio} | {train_ratio} |")
    for row in rows if args.profile else []:
        print(f"\nprofile, {row['teacher']}, {row['threads']} thread(s): share of the epoch's wall time")
        labels = [label for label, _, _ in runs]
        print("| category | " + " | ".join(f"{kind}, {name}" for name in labels for kind in ("unit", "final stage"))
              + " |")
        print("|---|" + "---|" * (2 * len(labels)))
        for category in [*SHARES, "other ops", "outside ops (Python, autograd engine, Lightning)"]:
            cells = [f"{row[name]['profile'].get(kind, {}).get(category, float('nan')) * 100:.0f} %"
                     for name in labels for kind in ("unit", "final stage")]
            print(f"| {category} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
