"""Deployed speed, size, memory and quality: our calibrated models in ONNX Runtime against FP32 and the peers.

For each shipped teacher (the digits UNet, the class-conditional digits DiT) and every row, DDIM-50 sampling of one
batch at each ``--batches`` size and ``--threads`` count (best of ``--repeats``), in one run on this machine:

* FP32 PyTorch (the diffusers model) and FP32 ONNX Runtime (``export_float_onnx``: the same graph form, float);
* ORT's own int8: ``onnxruntime.quantization.quantize_static`` of the FP32 graph (QDQ, its defaults: per-tensor
  int8, min-max ranges) calibrated on the inputs our activation ranges were initialised from: the peer a CPU user
  would try first;
* ours W8A8 and W4A8 in ONNX Runtime (``export_onnx`` of the AccuQuant exports, the OnnxDenoiser);
* ours W8A8 and W4A8 in PyTorch, ``dequant`` (the bit-exact reference) and ``int`` execution.

Each row's timings run in a subprocess of their own, so its peak memory (``ru_maxrss`` minus the RSS before the model
was loaded) is the row's. File = the weights file (``model.onnx``, ``quantized.safetensors`` or the FP
safetensors). Quality: the robust protocol (``--eval-samples`` held-out seeds in batches of 64, ``--quality-threads``
threads): per-sample final MSE against the FP PyTorch samples of the same noise (mean with bootstrap 95 % interval),
the digit-change share, and for ours in ONNX Runtime the paired ratio of its mean error to the PyTorch export's.
An integer-kernel profile of each ORT row (share of kernel time per operator at batch 16, one thread) says which
operators still run in float.

    python -m benchmarks.deploy_speed                        # both teachers, batches 1/16/64, threads 1/2
    python -m benchmarks.deploy_speed --teachers unet --batches 16 --threads 1 --eval-samples 128   # quick look

The AccuQuant exports come from the shipped configs (``python main.py fit --config configs/digits_w8a8_accuquant.yaml``
and ``digits_w4a8_accuquant``, ``digits_dit_w8a8_accuquant``, ``digits_dit_w4a8_accuquant``) in ``outputs/``.
Writes ``docs/results/deploy_speed.json``; ``--markdown`` prints the tables of docs/EXPORT.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from accuquant_pl.deploy.artifact import WEIGHTS_NAME
from accuquant_pl.deploy.onnx_export import ONNX_NAME
from benchmarks.common import REPO, proc_status_kb

TEACHERS = {
    "unet": {"folder": REPO / "models" / "digits-ddpm", "prefix": "digits_", "conditional": False},
    "dit": {"folder": REPO / "models" / "digits-dit", "prefix": "digits_dit_", "conditional": True},
}
MB = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teachers", default="unet,dit")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eval-samples", type=int, default=1024, help="held-out seeds of the quality protocol (0: none)")
    p.add_argument("--quality-threads", type=int, default=2)
    p.add_argument("--outputs", default=str(REPO / "outputs"), help="where the AccuQuant exports are")
    p.add_argument("--work", default=str(REPO / ".cache" / "deploy_speed"), help="ONNX folders written here")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "deploy_speed.json"))
    p.add_argument("--markdown", action="store_true", help="print the tables of an existing --out and stop")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: time one row in this process
    return p.parse_args(argv)


# ----- the models of a row -----

def load_row_model(row: dict[str, Any], threads: int) -> torch.nn.Module:
    """The denoiser a row samples with (``threads``: ORT's intra-op threads; torch's are set by the caller)."""
    from accuquant_pl.deploy import load_quantized
    from accuquant_pl.deploy.onnx_runtime import OnnxDenoiser
    from accuquant_pl.diffusion.loading import load_denoiser

    if row["runtime"] == "onnxruntime":
        return OnnxDenoiser(row["path"], threads=threads)
    if row["execution"] == "float":
        return load_denoiser(row["path"]).eval()
    return load_quantized(row["path"], execution=row["execution"])


def _conditioning(conditional: bool):  # noqa: ANN202
    if not conditional:
        return None
    from accuquant_pl.diffusion.conditioning import ConditioningSpec

    spec = ConditioningSpec(class_labels=list(range(10)))  # sample i of digit i % 10, as the DiT protocol
    return lambda seeds: spec.for_samples(torch.tensor(seeds))


def _scheduler(teacher: str) -> Any:
    from accuquant_pl.diffusion import load_scheduler_config, scheduler_from_config

    return scheduler_from_config("ddim", load_scheduler_config(TEACHERS[teacher]["folder"]))


def time_row(row: dict[str, Any], batches: list[int], threads: list[int], repeats: int, steps: int) -> dict:
    """Timings of one row (run in a subprocess): seconds of DDIM sampling per (threads, batch), and peak memory."""
    from accuquant_pl.evaluation.paired import samples_from

    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: imports are not the row's memory
    base_rss = proc_status_kb("VmRSS") * 1024
    scheduler, cond = _scheduler(row["teacher"]), _conditioning(TEACHERS[row["teacher"]]["conditional"])
    seconds: dict[str, float] = {}
    for n in threads:
        torch.set_num_threads(n)
        model = load_row_model(row, n)
        for b in batches:
            seeds = list(range(b))
            samples_from(model, scheduler, seeds, 2, batch_size=b, cond=cond)  # warm-up (sessions, allocator)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                with torch.no_grad():
                    samples_from(model, scheduler, seeds, steps, batch_size=b, cond=cond)
                best = min(best, time.perf_counter() - start)
            seconds[f"{n}x{b}"] = best
        del model
    peak = proc_status_kb("VmHWM") * 1024
    return {"seconds": seconds, "peak_memory_mb": (peak - base_rss) / MB}


def ort_profile(path: str, teacher: str, batch: int = 16) -> dict[str, float]:
    """Share of ONNX Runtime kernel time per operator type (one thread, ``batch``), over 10 forwards."""
    import onnx
    import onnxruntime as ort

    from accuquant_pl.deploy.onnx_export import read_onnx_folder
    from accuquant_pl.deploy.onnx_runtime import widen_int4

    meta = read_onnx_folder(path)
    proto = onnx.load(str(Path(path) / ONNX_NAME))
    widen_int4(proto)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling, options.log_severity_level = 1, True, 3
    options.profile_file_prefix = str(Path(path).parent / f"profile_{Path(path).name}")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in meta["inputs"]:
        shape = [batch if d == "batch" else d for d in spec["shape"]]
        feeds[spec["name"]] = (torch.zeros(shape, dtype=torch.int64) if spec["dtype"] == "int64"
                               else torch.randn(shape) if spec["name"] == "sample" else torch.full(shape, 500.0)).numpy()
    for _ in range(10):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            totals[e["args"]["op_name"]] = totals.get(e["args"]["op_name"], 0.0) + e["dur"]
    whole = sum(totals.values())
    return {op: round(t / whole, 4) for op, t in sorted(totals.items(), key=lambda kv: -kv[1])}


# ----- building the rows -----

def ort_int8(fp_folder: Path, out: Path, teacher: str, calibration: list[dict[str, torch.Tensor]]) -> Path:
    """ORT's own static int8 quantization (QDQ, defaults) of the FP32 graph, in the same folder form."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from accuquant_pl.deploy.onnx_export import read_onnx_folder, write_onnx_folder

    meta = read_onnx_folder(fp_folder)
    names = [i["name"] for i in meta["inputs"]]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{k: v.numpy() for k, v in zip(names, b.values(), strict=True)} for b in calibration])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    out.mkdir(parents=True, exist_ok=True)
    quantized = out / "ort_int8.onnx"
    quantize_static(str(fp_folder / ONNX_NAME), str(quantized), Reader(), quant_format=QuantFormat.QDQ)
    configs = {p.name: p.read_text() for p in fp_folder.glob("*_config.json")}
    return write_onnx_folder(out / f"{teacher}_ort_int8", onnx.load(str(quantized)),
                             {**{k: v for k, v in meta.items() if k not in ("format", "version", "opset")},
                              "peer": "onnxruntime.quantization.quantize_static (QDQ, defaults)"}, configs)


def calibration_inputs(teacher: str, samples: int = 64) -> list[dict[str, torch.Tensor]]:
    """Graph-ordered inputs for ORT's calibration: the FP trajectory states our activation ranges start from."""
    from accuquant_pl.data.trajectories import TrajectoryDataModule
    from accuquant_pl.diffusion.conditioning import ConditioningSpec
    from benchmarks.protocol import TRAJECTORY_CACHE

    conditional = TEACHERS[teacher]["conditional"]
    data = TrajectoryDataModule(pretrained=str(TEACHERS[teacher]["folder"]), num_inference_steps=50, num_trajectories=64,
                                batch_size=16, cache_dir=TRAJECTORY_CACHE,
                                conditioning=ConditioningSpec(class_labels=list(range(10))) if conditional else None)
    data.prepare_data()
    data.setup("fit")
    out = []
    for b in data.calibration_inputs(samples):
        row = {"sample": b["x"], "timestep": b["timesteps"][:, 0].float()}
        if conditional:
            row["class_labels"] = b.get("class_labels", torch.arange(b["x"].shape[0]) % 10)
        out.append(row)
    return out


def level_report(row: dict[str, Any], calibration: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Per-forward level agreement of an ORT row of ours with its PyTorch export, on FP trajectory states: for each
    timestep group, up to 16 states of that group with their own timesteps (one forward each)."""
    from accuquant_pl.deploy.onnx_export import read_onnx_folder
    from accuquant_pl.deploy.onnx_levels import first_divergence, level_agreement

    boundaries = torch.tensor(read_onnx_folder(row["path"])["timestep_boundaries"])
    states = {k: torch.cat([b[k] for b in calibration]) for k in calibration[0]}
    groups = torch.bucketize(states["timestep"], boundaries, right=True)
    out = []
    for g in groups.unique().tolist():
        pick = (groups == g).nonzero().reshape(-1)[:16]
        inputs = {k: v[pick] for k, v in states.items()}
        if TEACHERS[row["teacher"]]["conditional"]:
            inputs["hidden_states"] = inputs.pop("sample")
        report = level_agreement(row["export"], row["path"], inputs)
        first = first_divergence(report)
        elements = sum(r.elements for r in report.values())
        out.append({"group": g, "samples": int(pick.numel()), "quantizers": len(report),
                    "max_level_difference": max(r.max_difference for r in report.values()),
                    "differing_share": sum(r.differing for r in report.values()) / elements,
                    "first_divergence": None if first is None else {"quantizer": first[0], **vars(first[1])},
                    "per_quantizer_max": {k: r.max_difference for k, r in report.items()}})
    return out


def rows_of(teacher: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row of one teacher, exporting what is missing (ONNX folders under --work)."""
    from accuquant_pl.deploy.onnx_export import export_float_onnx, export_onnx

    info, work = TEACHERS[teacher], Path(args.work)
    exports = {bits: Path(args.outputs) / f"{info['prefix']}{bits}_accuquant" for bits in ("w8a8", "w4a8")}
    for bits, folder in exports.items():
        if not folder.is_dir():
            raise SystemExit(f"{folder} is missing: python main.py fit --config configs/{info['prefix']}{bits}_accuquant.yaml")
    fp_onnx = export_float_onnx(info["folder"], work / f"{teacher}_fp32")
    calibration = calibration_inputs(teacher)
    int8 = ort_int8(fp_onnx, work, teacher, calibration)
    ours = {bits: export_onnx(folder, work / f"{teacher}_{bits}") for bits, folder in exports.items()}
    fp_file = next(info["folder"].glob("*/diffusion_pytorch_model.safetensors"))
    rows = [
        {"name": "FP32 PyTorch", "runtime": "pytorch", "execution": "float", "path": str(info["folder"]),
         "file": str(fp_file)},
        {"name": "FP32 ONNX Runtime", "runtime": "onnxruntime", "path": str(fp_onnx), "file": str(fp_onnx / ONNX_NAME)},
        {"name": "ORT quantize_static int8 (peer)", "runtime": "onnxruntime", "path": str(int8),
         "file": str(int8 / ONNX_NAME)},
    ]
    for bits in ("w8a8", "w4a8"):
        rows.append({"name": f"ours {bits.upper()} ONNX Runtime", "runtime": "onnxruntime", "path": str(ours[bits]),
                     "file": str(ours[bits] / ONNX_NAME), "bits": bits, "export": str(exports[bits]),
                     "reference": f"ours {bits.upper()} PyTorch dequant"})
        rows[-1]["levels"] = level_report({**rows[-1], "teacher": teacher}, calibration)
        for execution in ("dequant", "int"):
            rows.append({"name": f"ours {bits.upper()} PyTorch {execution}", "runtime": "pytorch",
                         "execution": execution, "path": str(exports[bits]), "file": str(exports[bits] / WEIGHTS_NAME),
                         "bits": bits})
    for row in rows:
        row["teacher"] = teacher
        row["file_mb"] = Path(row["file"]).stat().st_size / MB
    return rows


def quality(rows: list[dict[str, Any]], teacher: str, args: argparse.Namespace) -> None:
    """Robust-protocol columns of every row (against the FP PyTorch samples), and the paired ratio of each ORT row of
    ours to its PyTorch export."""
    from accuquant_pl.evaluation.digit_classifier import DigitClassifier
    from accuquant_pl.evaluation.paired import samples_from
    from accuquant_pl.metrics.sample_errors import (
        PROTOCOL_BATCH_SIZE,
        PROTOCOL_FIRST_SEED,
        paired_comparison,
        per_sample_mse,
        sample_error_stats,
    )

    torch.set_num_threads(args.quality_threads)
    seeds = list(range(PROTOCOL_FIRST_SEED, PROTOCOL_FIRST_SEED + args.eval_samples))
    scheduler, cond = _scheduler(teacher), _conditioning(TEACHERS[teacher]["conditional"])
    classifier = DigitClassifier()
    samples = {}
    for row in rows:
        with torch.no_grad():
            samples[row["name"]] = samples_from(load_row_model(row, args.quality_threads), scheduler, seeds, args.steps,
                                                batch_size=PROTOCOL_BATCH_SIZE, cond=cond)
    fp = samples["FP32 PyTorch"]
    for row in rows:
        stats = sample_error_stats(fp, samples[row["name"]], labeller=classifier.labels)
        row["quality"] = {k: v for k, v in stats.as_dict().items() if k in ("num_samples", "mean", "mean_ci95",
                                                                              "p99", "label_change_share")}
        if "reference" in row:
            paired = paired_comparison(per_sample_mse(fp, samples[row["name"]]),
                                       per_sample_mse(fp, samples[row["reference"]]))
            row["quality"]["vs_pytorch_export"] = paired.as_dict()


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": _machine(), "steps": args.steps, "repeats": args.repeats, "teachers": {}}
    for teacher in args.teachers.split(","):
        rows = rows_of(teacher, args)
        for row in rows:
            timing_row = {k: v for k, v in row.items() if k != "levels"}
            done = subprocess.run([sys.executable, "-m", "benchmarks.deploy_speed", "--row", json.dumps(timing_row),
                                   "--batches", args.batches, "--threads", args.threads, "--repeats", str(args.repeats),
                                   "--steps", str(args.steps)],
                                  capture_output=True, text=True, cwd=REPO)
            if done.returncode:
                raise SystemExit(f"row {row['name']!r} failed:\n{done.stderr[-3000:]}")
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            if row["runtime"] == "onnxruntime":
                row["profile_b16"] = ort_profile(row["path"], teacher)
            print(teacher, row["name"], {k: round(v, 3) for k, v in row["seconds"].items()},
                  f"peak {row['peak_memory_mb']:.0f} MB, file {row['file_mb']:.3f} MB", flush=True)
        if args.eval_samples:
            quality(rows, teacher, args)
        fp = next(r for r in rows if r["name"] == "FP32 PyTorch")
        fp_ort = next(r for r in rows if r["name"] == "FP32 ONNX Runtime")
        for row in rows:
            row["speedup_vs_fp32_pytorch"] = {k: fp["seconds"][k] / v for k, v in row["seconds"].items()}
            row["speedup_vs_fp32_ort"] = {k: fp_ort["seconds"][k] / v for k, v in row["seconds"].items()}
            row["file_vs_fp32_onnx"] = row["file_mb"] / fp_ort["file_mb"]
        result["teachers"][teacher] = rows
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        from accuquant_pl.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


def _machine() -> dict[str, Any]:
    import os
    import platform

    import onnxruntime as ort

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "load_average_at_start": os.getloadavg()[0]}


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for teacher, rows in result["teachers"].items():
        keys = list(rows[0]["seconds"])
        lines += [f"\n{teacher}: DDIM-{result['steps']} sampling seconds (best of {result['repeats']}); "
                  "speed-up = FP32 PyTorch seconds / row seconds\n",
                  "| row | file MB | file / FP32 ONNX | peak MB | " + " | ".join(f"{k} s (x FP32 PT)" for k in keys)
                  + " | mean MSE vs FP [95% CI] | digit changed | vs PyTorch export [95% CI] |",
                  "|---|---|---|---|" + "---|" * len(keys) + "---|---|---|"]
        for r in rows:
            q = r.get("quality", {})
            mse = f"{q['mean']:.2e} [{q['mean_ci95'][0]:.2e}, {q['mean_ci95'][1]:.2e}]" if q else "-"
            change = f"{100 * q['label_change_share']:.1f} %" if q.get("label_change_share") is not None else "-"
            vs = q.get("vs_pytorch_export")
            paired = f"{vs['ratio']:.3f} [{vs['ratio_ci95'][0]:.3f}, {vs['ratio_ci95'][1]:.3f}]" if vs else "-"
            times = " | ".join(f"{r['seconds'][k]:.3f} ({r['speedup_vs_fp32_pytorch'][k]:.2f}x)" for k in keys)
            lines.append(f"| {r['name']} | {r['file_mb']:.3f} | {r['file_vs_fp32_onnx']:.3f} | "
                         f"{r['peak_memory_mb']:.0f} | {times} | {mse} | {change} | {paired} |")
    return "\n".join(lines)


SHORT_ROWS = ("FP32 PyTorch", "FP32 ONNX Runtime", "ORT quantize_static int8 (peer)", "ours W8A8 ONNX Runtime",
              "ours W4A8 ONNX Runtime")


def short_markdown(result: dict[str, Any], threads: int = 1) -> str:
    """The README's table: one thread, speed-up against FP32 PyTorch per batch, file size, quality."""
    lines = []
    for teacher, rows in result["teachers"].items():
        keys = [k for k in rows[0]["seconds"] if k.startswith(f"{threads}x")]
        lines += [f"\n{teacher} teacher, DDIM-{result['steps']}, {threads} thread(s): speed-up over FP32 PyTorch\n",
                  "| | " + " | ".join(f"batch {k.split('x')[1]}" for k in keys)
                  + " | file / FP32 ONNX | mean final MSE vs FP | digit changed |",
                  "|---|" + "---|" * len(keys) + "---|---|---|"]
        for r in (r for r in rows if r["name"] in SHORT_ROWS):
            q = r.get("quality", {})
            lines.append(f"| {r['name']} | " + " | ".join(f"{r['speedup_vs_fp32_pytorch'][k]:.2f}x" for k in keys)
                         + f" | {r['file_vs_fp32_onnx']:.3f} | {q.get('mean', float('nan')):.2e} | "
                         + (f"{100 * q['label_change_share']:.1f} % |" if q.get("label_change_share") is not None
                            else "- |"))
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.row is not None:
        row = json.loads(args.row)
        out = time_row(row, [int(b) for b in args.batches.split(",")], [int(t) for t in args.threads.split(",")],
                       args.repeats, args.steps)
        print(json.dumps(out))
        return
    if args.markdown:
        result = json.loads(Path(args.out).read_text())
        print(markdown(result), "\n", short_markdown(result))
        return
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
