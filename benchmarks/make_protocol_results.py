"""Writes docs/results.md, the whole page, from docs/results/main_comparison.json (and main_comparison_dit.json, the
DiT teacher's), core_ablation.json and peers.json; and the README's main-comparison and peer tables (each between
its own marker comments) from the same JSON.

Cheap (no sampling, no FID): it only formats the rows those benchmarks wrote (and plots the error curves). It is
the one writer of docs/results.md; the earlier 128-seed tables are archived, as they were, in
docs/results_128_seeds.md.

    python -m benchmarks.make_protocol_results
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accuquant_pl.evaluation.plots import plot_error_curves
from accuquant_pl.io import atomic_write_text
from accuquant_pl.metrics.sample_errors import paired_comparison
from benchmarks.common import REPO
from benchmarks.core_ablation import BASE_ROW, CORE_CHOICES

START, END = "<!-- robust-protocol:start -->", "<!-- robust-protocol:end -->"


def _stats_cells(r: dict[str, Any]) -> str:
    lo, hi = r["mean_ci95"]
    change = "-" if r.get("label_change_share") is None else f"{100 * r['label_change_share']:.1f} %"
    return (f"{r['mean']:.5f} [{lo:.5f}, {hi:.5f}] | {r['median']:.6f} | {r['p99']:.4f} | "
            f"{100 * r['share_above']:.1f} % | {change}")


def _paired_vs(r: dict[str, Any], base: dict[str, Any] | None) -> str:
    if base is None or base is r or "per_sample_mse" not in r:
        return "-"
    c = paired_comparison(torch.tensor(r["per_sample_mse"]), torch.tensor(base["per_sample_mse"]))
    mark = " *" if c.excludes_one else ""
    return f"{c.ratio:.2f} [{c.ratio_ci95[0]:.2f}, {c.ratio_ci95[1]:.2f}]{mark}"


def core_ablation_lines(data: dict[str, Any]) -> list[str]:
    rows = data["rows"]
    protocol = data["protocol"]
    defaults = {r["bits"]: r for r in rows if r["row"] == BASE_ROW}
    lines = ["### Core ablation: round-to-nearest, one quantization-core choice per row", "",
             f"`python -m benchmarks.core_ablation --threads {rows[0]['threads']}` ({len(rows)} rows). "
             f"{data['settings']['eval_samples']} held-out seeds from {protocol['first_seed']}, sampled in batches "
             f"of {protocol['batch_size']}; activation ranges from {data['settings']['num_trajectories']} FP "
             "calibration trajectories; no optimisation. Each row departs in the named choice only from the base: the "
             "default `QuantSpec` with one activation range for all timesteps (`act_timestep_groups: 1`, the "
             "default before this ablation; the 4-group row is the default now). *vs base*: the row's mean error "
             "over the base row's, paired on the same seeds, with a bootstrap 95 % interval; * marks an interval "
             "that excludes 1.", "",
             "| bits | core choice | mean final MSE [95 % CI] | median | p99 | share > 0.01 | digit changed | "
             "vs base |", "|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(CORE_CHOICES)}
    bits_order = {b: i for i, b in enumerate(("w8a8", "w4a8", "w4a4"))}
    rows = sorted(rows, key=lambda r: (bits_order.get(r["bits"], 9), order.get(r["row"], len(order))))
    lines += [f"| {r['bits'].upper()} | {r['row']} | {_stats_cells(r)} | {_paired_vs(r, defaults.get(r['bits']))} |"
              for r in rows]
    return [*lines, ""]


def _peers_table(data: dict[str, Any]) -> list[str]:
    lines = ["| bits | method | quantizes (cw / lw / ci / li / out / attn) | mean final MSE [95 % CI] | median | p99 | "
             "share > 0.01 | digit changed |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['bits'].upper()} | {r['method']} | cannot run: {r['skipped']} | | | | | |")
            continue
        q = r["quantizes"]
        ops = " / ".join(str(q[k]) for k in ("conv_weights", "linear_weights", "conv_inputs", "linear_inputs",
                                             "outputs", "attention_matmuls"))
        lines.append(f"| {r['bits'].upper()} | {r['method']} | {ops} | {_stats_cells(r)} |")
    return lines


PEERS_NOTE = ("Quantized operations counted on each model: conv / linear weights, conv / linear inputs, module outputs, "
              "attention act-act matmul operand pairs. The counts say which tensors, not at which bits: quanto "
              "quantizes conv_in and conv_out like every other layer, ours keep them at 8 bits (`first_last_bits`).")


def peers_lines(data: dict[str, Any]) -> list[str]:
    lines = ["### Peers: optimum-quanto against our round-to-nearest", "",
             f"`python -m benchmarks.peers --threads {data['settings']['threads']}`. {PEERS_NOTE} The core "
             "ablation's 'first/last layers at the base bits' row is our figure with them at the base bits too.", "",
             *_peers_table(data)]
    return [*lines, ""]


PEERS_README_START, PEERS_README_END = "<!-- peers:start -->", "<!-- peers:end -->"


def readme_peers_lines(data: dict[str, Any]) -> list[str]:
    """The README's peer table: the page's, between its own markers."""
    return [PEERS_README_START, "", f"`python -m benchmarks.peers --threads {data['settings']['threads']}`, then "
            f"`python -m benchmarks.make_protocol_results`: the robust protocol above, round-to-nearest, activation "
            f"ranges from {data['settings']['act_calibration_samples']} inputs of the same FP trajectories. "
            f"{PEERS_NOTE}", "", *_peers_table(data), "", PEERS_README_END]


METHOD_NAMES = {"rtn": "RTN", "per_step": "per-step (Q-Diffusion/BRECQ)", "accuquant": "AccuQuant (shipped recipe)",
                "accuquant_block_n2": "AccuQuant block-output n = 2"}


def _seconds(row: dict) -> str:
    load = row.get("load_average")
    loaded = row.get("timing_note") or (load is not None and load > row["threads"] + 0.5)
    return f"{row['calibration_seconds']:.0f}" + (" †" if loaded else "")


def _mean_std(values: list[float], fmt: str) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    if len(values) == 1:
        return f"{float(t[0]):{fmt}}"  # one seed: no spread to report
    return f"{float(t.mean()):{fmt}} ± {float(t.std()):{fmt}}"


def _by_method(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(bits, method) -> its rows in seed order, groups in bits then METHOD_NAMES order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["bits"], list(METHOD_NAMES).index(r["method"]), r["seed"])):
        groups.setdefault((r["bits"], r["method"]), []).append(r)
    return groups


# column -> (row value, format, unit); the page and the README pick their columns from this one list
_SUMMARY = {"mean": (lambda r: r["mean"], ".5f", ""), "median": (lambda r: r["median"], ".6f", ""),
            "share > 0.01": (lambda r: 100 * r["share_above"], ".1f", " %"),
            "digit changed": (lambda r: 100 * r["label_change_share"], ".1f", " %"),
            "FID": (lambda r: r["fid"], ".2f", ""), "FID2FP32": (lambda r: r["fid2fp32"], ".2f", ""),
            "KID": (lambda r: r["kid"], ".4f", "")}


def _summary_cells(rs: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    """Mean ± std over the calibration seeds of each named column (shares in %)."""
    return [_mean_std([value(r) for r in rs], fmt) + unit for value, fmt, unit in (_SUMMARY[c] for c in columns)]


@dataclass(frozen=True)
class TeacherPage:
    """How one teacher's main-comparison rows are introduced on the page (``main_comparison.py --teacher``)."""

    json_name: str
    title: str
    flag: str
    teacher: str
    configs: str
    curves: str


TEACHER_PAGES = {
    "unet": TeacherPage("main_comparison.json", "Main comparison: RTN, per-step and AccuQuant, calibration seeds",
                        "", "the shipped digits teacher (models/digits-ddpm, a UNet)",
                        "configs/digits_<bits>_{rtn,qdiff,accuquant}.yaml", "main_comparison_curves"),
    "dit": TeacherPage("main_comparison_dit.json",
                       "Second architecture: the class-conditional DiT teacher, calibration seeds", " --teacher dit",
                       "the shipped class-conditional transformer teacher (models/digits-dit; sample i of class i % 10)",
                       "configs/digits_dit_<bits>_{rtn,qdiff,accuquant}.yaml", "main_comparison_dit_curves"),
}


N2_NOTE = "; block-output n = 2 is the AccuQuant config with `data.group_size: 2` and no final stage"


def main_comparison_lines(data: dict[str, Any], results: Path, page: TeacherPage,
                          pooled: dict[tuple[str, str], tuple[list[int], Any]]) -> list[str]:
    """Mean ± std over calibration seeds per (bits, method), the per-seed rows with AccuQuant's paired ratio
    against the per-step baseline of the same seed, and the error-accumulation plot of each bit width (seed 0)."""
    rows, protocol = data["rows"], data["protocol"]
    lines = [f"### {page.title}", "",
             f"`python -m benchmarks.main_comparison{page.flag} --threads {rows[0]['threads']}` ({len(rows)} rows, one "
             f"sweep on one machine). Each row calibrates {page.teacher} with the shipped config "
             f"(`{page.configs}`{N2_NOTE if any(r['method'] == 'accuquant_block_n2' for r in rows) else ''}) at the "
             "given calibration seed (`seed_everything` and the trajectory seed) and evaluates its export on "
             f"{protocol['samples']} held-out seeds in batches of "
             f"{protocol['batch_size']}. FID / FID2FP32 / KID ({protocol['features']} features) on the same samples; "
             "FID of the FP samples against the real digits: "
             f"{rows[0]['fid_fp']:.2f}.", "",
             "| bits | method | seeds | mean final MSE | median | share > 0.01 | digit changed | FID | FID2FP32 | KID |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cpus = sorted({r.get("cpu", "unknown") for r in rows})
    if len(cpus) > 1:
        lines[2] += (f" **The rows ran on {len(cpus)} CPU models ({'; '.join(cpus)}): compare only rows of one "
                     "calibration seed, which ran back to back.**")
    for (bits, method), rs in _by_method(rows).items():
        cells = _summary_cells(rs, ("mean", "median", "share > 0.01", "digit changed", "FID", "FID2FP32", "KID"))
        lines.append(f"| {bits.upper()} | {METHOD_NAMES.get(method, method)} | "
                     f"{','.join(str(r['seed']) for r in rs)} | {' | '.join(cells)} |")
    lines += ["", "Per seed. *vs per-step*: the row's mean error over the per-step baseline's of the same calibration "
              "seed, paired on the evaluation seeds, bootstrap 95 % interval (* excludes 1); median ratio likewise.",
              "", "| bits | method | seed | mean final MSE [95 % CI] | median | p99 | share > 0.01 | digit changed | "
              "FID2FP32 | vs per-step | median vs per-step | calibration s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["bits"], r["seed"]): r for r in rows if r["method"] == "per_step"}
    for r in sorted(rows, key=lambda r: (r["bits"], r["seed"], list(METHOD_NAMES).index(r["method"]))):
        b = base.get((r["bits"], r["seed"]))
        median_ratio = "-" if b is None or b is r else f"{r['median'] / b['median']:.2f}"
        lines.append(f"| {r['bits'].upper()} | {METHOD_NAMES.get(r['method'], r['method'])} | {r['seed']} | "
                     f"{_stats_cells(r)} | {r['fid2fp32']:.2f} | {_paired_vs(r, b)} | {median_ratio} | "
                     f"{_seconds(r)} |")
    lines += ["", "Calibration seconds marked † were taken while other jobs loaded the machine (1-minute load average "
              "above the row's thread count); they are not timings of the method.", ""]
    lines += seed_pooled_lines(pooled)
    for bits in sorted({r["bits"] for r in rows}):
        seed0 = {METHOD_NAMES.get(r["method"], r["method"]): (r["per_step"], r["accumulated"])
                 for r in rows if r["bits"] == bits and r["seed"] == min(x["seed"] for x in rows if x["bits"] == bits)}
        name = f"{page.curves}_{bits}.png"
        plot_error_curves(seed0, results / name, title=f"{bits.upper()}: error along the DDIM-50 trajectory "
                          f"(first 256 protocol seeds, calibration seed 0)")
        lines += [f"![{bits.upper()} error accumulation](results/{name})", ""]
    return lines


def seed_pooled(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[list[int], Any]]:
    """(bits, method) -> (seeds, paired comparison against the per-step baseline) over all calibration seeds both
    ran (at least two): each evaluation sample's error averaged over the seeds, then paired on the evaluation
    seeds (the interval resamples evaluation seeds with the calibrations fixed, so the per-seed rows carry the
    calibration-seed spread)."""
    out = {}
    for bits in sorted({r["bits"] for r in rows}):
        base = {r["seed"]: r for r in rows if r["bits"] == bits and r["method"] == "per_step"}
        for method in METHOD_NAMES:
            mine = {r["seed"]: r for r in rows if r["bits"] == bits and r["method"] == method}
            seeds = sorted(set(mine) & set(base))
            if method == "per_step" or len(seeds) < 2:
                continue
            a = torch.tensor([mine[s]["per_sample_mse"] for s in seeds], dtype=torch.float64).mean(0)
            b = torch.tensor([base[s]["per_sample_mse"] for s in seeds], dtype=torch.float64).mean(0)
            out[bits, method] = (seeds, paired_comparison(a, b))
    return out


def _ratio(c: Any) -> str:
    return f"{c.ratio:.2f} [{c.ratio_ci95[0]:.2f}, {c.ratio_ci95[1]:.2f}]{' *' if c.excludes_one else ''}"


def seed_pooled_lines(pooled: dict[tuple[str, str], tuple[list[int], Any]]) -> list[str]:
    out = [f"| {bits.upper()} | {METHOD_NAMES[method]} | {','.join(map(str, seeds))} | {_ratio(c)} | "
           f"{c.median_ratio:.2f} | {100 * c.a_lower_share:.0f} % |"
           for (bits, method), (seeds, c) in pooled.items()]
    if not out:
        return []
    return ["Over the calibration seeds: each evaluation sample's final MSE averaged over the seeds both methods ran, "
            "then paired against the per-step baseline on the evaluation seeds (bootstrap 95 % interval over "
            "evaluation seeds with the calibrations fixed; * excludes 1).", "",
            "| bits | method | seeds | mean vs per-step [95 % CI] | median vs per-step | samples lower than per-step |",
            "|---|---|---|---|---|---|", *out, ""]


README_START, README_END = "<!-- main-comparison:start -->", "<!-- main-comparison:end -->"


def readme_lines(data: dict[str, Any], pooled: dict[tuple[str, str], tuple[list[int], Any]]) -> list[str]:
    """The README's results table: mean ± std over calibration seeds per (bits, method), and the seed-pooled
    paired ratio against the per-step baseline (``seed_pooled(data["rows"])``)."""
    rows, protocol = data["rows"], data["protocol"]
    lines = [README_START, "",
             f"`python -m benchmarks.main_comparison --threads {rows[0]['threads']}`, then "
             "`python -m benchmarks.make_protocol_results`: the shipped digits teacher, each config as shipped, "
             f"calibration seeds as listed, {protocol['samples']} held-out evaluation seeds in batches of "
             f"{protocol['batch_size']}, DDIM 50; final-sample MSE against the FP sample of the same noise, mean ± std "
             "over calibration seeds; FID of the FP samples themselves "
             f"{rows[0]['fid_fp']:.2f}. *vs per-step*: seed-pooled paired ratio of the means, 95 % interval over "
             "evaluation seeds (* excludes 1).", "",
             "| bits | method | seeds | mean final MSE | median | digit changed | FID | FID2FP32 | vs per-step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (bits, method), rs in _by_method(rows).items():
        vs = _ratio(pooled[bits, method][1]) if (bits, method) in pooled else "-"
        cells = _summary_cells(rs, ("mean", "median", "digit changed", "FID", "FID2FP32"))
        lines.append(f"| {bits.upper()} | {METHOD_NAMES.get(method, method)} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{' | '.join(cells)} | {vs} |")
    return [*lines, "", README_END]


def target_lines(main: dict[str, Any], peers: dict[str, Any] | None) -> list[str]:
    """The issue's targets next to the measured values (whatever rows exist so far)."""
    rows = main["rows"]
    lines = ["### Targets against the measured values", "", "| target | measured | met |", "|---|---|---|"]

    def of(bits: str, method: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["bits"] == bits and r["method"] == method]

    quanto = next((r for r in (peers or {}).get("rows", []) if r["bits"] == "w8a8" and "quanto" in r["method"]
                   and "mean" in r), None)
    acc8 = of("w8a8", "accuquant")
    if acc8 and quanto is not None:
        mean = sum(r["mean"] for r in acc8) / len(acc8)
        change = max(r["label_change_share"] for r in acc8)
        lines.append(f"| W8A8 AccuQuant mean final MSE <= 0.5x optimum-quanto W8A8's ({quanto['mean']:.5f}), every "
                     f"conv/linear input quantized | {mean:.5f} ({mean / quanto['mean']:.2f}x; seeds "
                     f"{','.join(str(r['seed']) for r in acc8)}) | {'yes' if mean <= 0.5 * quanto['mean'] else 'no'} |")
        lines.append(f"| W8A8 AccuQuant digit-change share <= 0.5 % | worst seed {100 * change:.1f} % | "
                     f"{'yes' if change <= 0.005 else 'no'} |")
    per_step = {r["seed"]: r for r in of("w4a8", "per_step")}
    pairs = [(r, per_step[r["seed"]]) for r in of("w4a8", "accuquant") if r["seed"] in per_step]
    if pairs:
        comps = [paired_comparison(torch.tensor(a["per_sample_mse"]), torch.tensor(b["per_sample_mse"])) for a, b in pairs]
        mean_ok = all(c.ratio <= 0.6 and c.ratio_ci95[1] < 1 for c in comps)
        median_ok = all(a["median"] <= 0.6 * b["median"] for a, b in pairs)
        far_ok = all(a["share_above"] <= 0.5 * b["share_above"] and a["label_change_share"] <= 0.5 * b["label_change_share"]
                     for a, b in pairs)
        cells = "; ".join(f"seed {a['seed']}: {c.ratio:.2f} [{c.ratio_ci95[0]:.2f}, {c.ratio_ci95[1]:.2f}]"
                          for (a, _), c in zip(pairs, comps, strict=True))
        lines.append(f"| W4A8 AccuQuant mean <= 0.6x per-step's, paired interval excluding 1, every seed | {cells} | "
                     f"{'yes' if mean_ok else 'no'} |")
        lines.append("| W4A8 AccuQuant median <= 0.6x per-step's, every seed | "
                     + "; ".join(f"seed {a['seed']}: {a['median'] / b['median']:.2f}" for a, b in pairs)
                     + f" | {'yes' if median_ok else 'no'} |")
        lines.append("| W4A8 share > 0.01 and changed digits <= 0.5x per-step's, every seed | "
                     + "; ".join(f"seed {a['seed']}: {a['share_above'] / max(b['share_above'], 1e-12):.2f} / "
                                 f"{a['label_change_share'] / max(b['label_change_share'], 1e-12):.2f}" for a, b in pairs)
                     + f" | {'yes' if far_ok else 'no'} |")
    acc4 = of("w4a4", "accuquant")
    if acc4:
        fid = sum(r["fid"] for r in acc4) / len(acc4)
        fid_fp = acc4[0]["fid_fp"]
        lines.append(f"| W4A4 FID vs real within 1.2x FP's ({fid_fp:.2f}) | {fid:.2f} ({fid / fid_fp:.2f}x) | "
                     f"{'yes' if fid <= 1.2 * fid_fp else 'no'} |")
    return [*lines, ""] if len(lines) > 4 else []


def _rows_of(path: Path) -> dict[str, Any] | None:
    """A benchmark's JSON when it has written rows, else None."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data["rows"] else None


def protocol_section(results: Path, main: dict[str, Any] | None = None,
                     pooled: dict[tuple[str, str], tuple[list[int], Any]] | None = None) -> list[str]:
    """The section's lines (with its markers); empty when no benchmark has written rows yet. ``main`` and
    ``pooled``: main_comparison.json and its seed-pooled comparison when the caller already has them."""
    body: list[str] = []
    main = main if main is not None else _rows_of(results / "main_comparison.json")
    if main is not None:
        pooled = seed_pooled(main["rows"]) if pooled is None else pooled
        body += (target_lines(main, _rows_of(results / "peers.json"))
                 + main_comparison_lines(main, results, TEACHER_PAGES["unet"], pooled))
    dit = _rows_of(results / TEACHER_PAGES["dit"].json_name)
    if dit is not None:
        body += main_comparison_lines(dit, results, TEACHER_PAGES["dit"], seed_pooled(dit["rows"]))
    for name, fmt in (("core_ablation.json", core_ablation_lines), ("peers.json", peers_lines)):
        data = _rows_of(results / name)
        if data is not None:
            body += fmt(data)
    if not body:
        return []
    intro = ["## Robust protocol (per-sample statistics over 1024 seeds)", "",
             "Final-sample MSE against the FP sampler from the same noise, per sample: mean with a percentile-"
             "bootstrap 95 % interval, median, 99th percentile, share of samples further than 0.01 from their FP "
             "sample, and share whose digit (the shipped classifier's reading) changes. A few samples whose "
             "trajectory flips to another digit carry most of the mean, hence the other columns.", ""]
    return [START, *intro, *body, END]


PAGE_HEAD = [
    "# Results on the shipped digits teacher", "",
    "Generated by `python -m benchmarks.make_protocol_results` from the JSON rows in docs/results/ that the "
    "robust-protocol benchmarks write (`bash benchmarks/run_all.sh` runs them all; benchmarks/README.md says what "
    "each measures). The tables measured before the robust protocol (128 evaluation seeds, one calibration seed) "
    "are archived in [results_128_seeds.md](results_128_seeds.md).", ""]
"""The page's title and introduction, above the robust-protocol section."""


def write_page(page: Path, section: list[str]) -> None:
    """Write the whole results page: ``PAGE_HEAD`` and the robust-protocol section (``protocol_section``)."""
    atomic_write_text(page, "\n".join([*PAGE_HEAD, *section]) + "\n")


def write_section(page: Path, section: list[str]) -> None:
    """Replace the text between the section's first and last line (its markers), or append the section."""
    text = page.read_text() if page.is_file() else ""
    block = "\n".join(section)
    start, end = section[0], section[-1]
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(page, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "docs" / "results"))
    parser.add_argument("--page", default=str(REPO / "docs" / "results.md"), help="written whole")
    parser.add_argument("--readme", default=str(REPO / "README.md"),
                        help="its main-comparison table (between its markers) is rewritten from main_comparison.json")
    args = parser.parse_args(argv)
    comparison = _rows_of(Path(args.results) / "main_comparison.json")
    # the bootstrap runs once for page and README
    pooled = seed_pooled(comparison["rows"]) if comparison is not None else None
    lines = protocol_section(Path(args.results), comparison, pooled)
    if not lines:
        raise SystemExit("no rows in docs/results/core_ablation.json or peers.json yet")
    write_page(Path(args.page), lines)
    print("\n".join(lines))
    if comparison is not None:
        write_section(Path(args.readme), readme_lines(comparison, pooled))
    peers = _rows_of(Path(args.results) / "peers.json")
    if peers is not None:
        write_section(Path(args.readme), readme_peers_lines(peers))


if __name__ == "__main__":
    main()
