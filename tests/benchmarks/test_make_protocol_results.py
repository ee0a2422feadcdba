"""docs/results.md is written whole (title and the robust-protocol section) from the benchmarks' JSON; the README's
tables are written between their markers and replaced on a rerun."""

from __future__ import annotations

import json

from benchmarks.core_ablation import BASE_ROW
from benchmarks.make_protocol_results import (
    END,
    PAGE_HEAD,
    PEERS_README_END,
    PEERS_README_START,
    README_END,
    README_START,
    START,
    protocol_section,
    readme_lines,
    readme_peers_lines,
    seed_pooled,
    write_page,
    write_section,
)
from tests.conftest import REPO

STATS = {"mean": 0.00125, "mean_ci95": [0.0007, 0.00185], "median": 9.1e-05, "p99": 0.0418, "share_above": 0.013,
         "label_change_share": 0.021}


def test_section_from_the_benchmarks_json_replaces_itself(tmp_path):
    (tmp_path / "core_ablation.json").write_text(json.dumps({
        "settings": {"eval_samples": 1024, "num_trajectories": 64},
        "protocol": {"first_seed": 100000, "batch_size": 64},
        "rows": [{"bits": "w8a8", "row": BASE_ROW, "threads": 2, **STATS, "per_sample_mse": [0.002, 0.004, 0.006]},
                 {"bits": "w8a8", "row": "halved", "threads": 2, **STATS, "per_sample_mse": [0.001, 0.002, 0.003]}]}))
    (tmp_path / "peers.json").write_text(json.dumps({"settings": {"threads": 2, "act_calibration_samples": 256}, "rows": [
        {"bits": "w8a8", "method": "optimum-quanto 0.2.7", **STATS,
         "quantizes": {"conv_weights": 25, "linear_weights": 26, "conv_inputs": 0, "linear_inputs": 26,
                       "outputs": 4, "attention_matmuls": 0}},
        {"bits": "w4a4", "method": "optimum-quanto 0.2.7", "skipped": "no int4 activations"}]}))
    lines = protocol_section(tmp_path)
    text = "\n".join(lines)
    assert lines[0] == START and lines[-1] == END
    assert "| W8A8 | base: one activation range (earlier default) | 0.00125 [0.00070, 0.00185] | 0.000091 | 0.0418 | 1.3 % | 2.1 % | - |" in text
    assert "| W8A8 | halved |" in text and "| 0.50 [0.50, 0.50] * |" in text  # paired with the default row
    assert "| W8A8 | optimum-quanto 0.2.7 | 25 / 26 / 0 / 26 / 4 / 0 |" in text
    assert "| W4A4 | optimum-quanto 0.2.7 | cannot run: no int4 activations |" in text
    readme = readme_peers_lines(json.loads((tmp_path / "peers.json").read_text()))
    assert readme[0] == PEERS_README_START and readme[-1] == PEERS_README_END
    assert "| W8A8 | optimum-quanto 0.2.7 | 25 / 26 / 0 / 26 / 4 / 0 |" in "\n".join(readme)
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nearlier tables\n")
    write_section(page, lines)
    write_section(page, lines)  # a rerun replaces the section instead of appending a second one
    written = page.read_text()
    assert written.startswith("# Results\n\nearlier tables\n") and written.count(START) == 1
    assert protocol_section(tmp_path / "missing") == []
    write_page(page, lines)  # the results page: written whole, nothing of what was there is kept
    assert page.read_text() == "\n".join([*PAGE_HEAD, *lines]) + "\n"


def test_the_committed_results_page_is_the_one_make_protocol_results_writes():
    text = (REPO / "docs" / "results.md").read_text()
    assert text.startswith("\n".join(PAGE_HEAD) + "\n" + START + "\n") and text.endswith(END + "\n")
    assert text.count(START) == 1 and text.count(END) == 1


def _comparison_row(method: str, seed: int, errors: list[float]) -> dict:
    return {"bits": "w4a8", "method": method, "seed": seed, "threads": 2, "calibration_seconds": 60.0, **STATS,
            "mean": sum(errors) / len(errors), "per_sample_mse": errors, "fid": 5.0, "fid_fp": 4.0,
            "fid2fp32": 1.0 + seed, "kid": 0.001, "per_step": [1e-4, 2e-4], "accumulated": [1e-4, 3e-4]}


def test_main_comparison_reports_seed_spread_paired_ratios_and_curves(tmp_path):
    rows = [_comparison_row("per_step", s, [0.002, 0.004, 0.006]) for s in (0, 1)]
    rows += [_comparison_row("accuquant", 0, [0.001, 0.002, 0.003]), _comparison_row("accuquant", 1, [0.002, 0.004, 0.006])]
    (tmp_path / "main_comparison.json").write_text(json.dumps({
        "protocol": {"first_seed": 100000, "samples": 3, "batch_size": 64, "features": "inception"}, "rows": rows}))
    text = "\n".join(protocol_section(tmp_path))
    # mean ± std over the two calibration seeds: per-step 0.004 both times, AccuQuant 0.002 and 0.004
    assert "| W4A8 | per-step (Q-Diffusion/BRECQ) | 0,1 | 0.00400 ± 0.00000 |" in text
    assert "| W4A8 | AccuQuant (shipped recipe) | 0,1 | 0.00300 ± 0.00141 |" in text
    # per seed, paired against the per-step row of the same seed
    assert "| W4A8 | AccuQuant (shipped recipe) | 0 | 0.00200 [" in text and "| 0.50 [0.50, 0.50] * |" in text
    assert "| W4A8 | AccuQuant (shipped recipe) | 1 | 0.00400 [" in text and "| 1.00 [1.00, 1.00] |" in text
    assert (tmp_path / "main_comparison_curves_w4a8.png").stat().st_size > 1000


def test_targets_are_set_against_the_measured_rows(tmp_path):
    rows = [_comparison_row("per_step", 0, [0.002, 0.004, 0.006]), _comparison_row("accuquant", 0, [0.001, 0.001, 0.002])]
    rows[0]["share_above"], rows[1]["share_above"] = 0.1, 0.04
    rows[0]["median"], rows[1]["median"] = 0.004, 0.001
    (tmp_path / "main_comparison.json").write_text(json.dumps({
        "protocol": {"first_seed": 100000, "samples": 3, "batch_size": 64, "features": "inception"}, "rows": rows}))
    text = "\n".join(protocol_section(tmp_path))
    assert "| W4A8 AccuQuant mean <= 0.6x per-step's, paired interval excluding 1, every seed | seed 0: 0.33 [" in text
    assert "| W4A8 AccuQuant median <= 0.6x per-step's, every seed | seed 0: 0.25 | yes |" in text
    # changed digits equal (the fixture's 2.1 % on both): that target is not met
    assert "| W4A8 share > 0.01 and changed digits <= 0.5x per-step's, every seed | seed 0: 0.40 / 1.00 | no |" in text


def test_dit_teacher_rows_get_their_own_subsection_and_curves(tmp_path):
    unet = [_comparison_row("per_step", 0, [0.002, 0.004, 0.006])]
    dit = [_comparison_row("per_step", 0, [0.004, 0.004, 0.004]), _comparison_row("accuquant", 0, [0.002, 0.002, 0.002])]
    protocol = {"first_seed": 100000, "samples": 3, "batch_size": 64, "features": "inception"}
    (tmp_path / "main_comparison.json").write_text(json.dumps({"protocol": protocol, "rows": unet}))
    (tmp_path / "main_comparison_dit.json").write_text(json.dumps({"protocol": protocol, "rows": dit}))
    text = "\n".join(protocol_section(tmp_path))
    unet_part, _, dit_part = text.partition("### Second architecture: the class-conditional DiT teacher")
    assert dit_part, text
    assert "`python -m benchmarks.main_comparison --teacher dit --threads 2` (2 rows" in dit_part
    assert "configs/digits_dit_<bits>_{rtn,qdiff,accuquant}.yaml" in dit_part
    # the DiT AccuQuant row is paired with the DiT per-step row, not the UNet's
    assert "| W4A8 | AccuQuant (shipped recipe) | 0 | 0.00200 [" in dit_part and "| 0.50 [0.50, 0.50] * |" in dit_part
    assert "| W4A8 | AccuQuant (shipped recipe)" not in unet_part  # the UNet sweep has no AccuQuant row here
    assert (tmp_path / "main_comparison_dit_curves_w4a8.png").stat().st_size > 1000
    assert (tmp_path / "main_comparison_curves_w4a8.png").stat().st_size > 1000
    # DiT rows alone (the UNet sweep not run yet) still make a section
    (tmp_path / "main_comparison.json").unlink()
    assert "### Second architecture" in "\n".join(protocol_section(tmp_path))


def test_methods_are_compared_over_the_seeds_pooled(tmp_path):
    # per sample, averaged over seeds 0 and 1: per-step (0.003, 0.003, 0.003), AccuQuant (0.0015, 0.003, 0.0045)
    rows = [_comparison_row("per_step", 0, [0.002, 0.002, 0.002]), _comparison_row("per_step", 1, [0.004, 0.004, 0.004]),
            _comparison_row("accuquant", 0, [0.001, 0.002, 0.003]), _comparison_row("accuquant", 1, [0.002, 0.004, 0.006]),
            _comparison_row("rtn", 0, [0.004, 0.004, 0.004])]  # one seed only: no pooled row
    (tmp_path / "main_comparison.json").write_text(json.dumps({
        "protocol": {"first_seed": 100000, "samples": 3, "batch_size": 64, "features": "inception"}, "rows": rows}))
    text = "\n".join(protocol_section(tmp_path))
    pooled = text.split("Over the calibration seeds")[1]
    assert "| W4A8 | AccuQuant (shipped recipe) | 0,1 | 1.00 [" in pooled
    assert "| 1.00 | 33 % |" in pooled  # median 0.003 vs 0.003; one sample of three lower
    assert "| W4A8 | RTN |" not in pooled.split("![")[0]


def test_readme_table_is_rewritten_between_its_markers(tmp_path):
    rows = [_comparison_row("per_step", 0, [0.002, 0.002, 0.002]), _comparison_row("per_step", 1, [0.004, 0.004, 0.004]),
            _comparison_row("accuquant", 0, [0.001, 0.001, 0.001]), _comparison_row("accuquant", 1, [0.002, 0.002, 0.002])]
    data = {"protocol": {"first_seed": 100000, "samples": 3, "batch_size": 64, "features": "inception"}, "rows": rows}
    lines = readme_lines(data, seed_pooled(rows))
    assert lines[0] == README_START and lines[-1] == README_END
    text = "\n".join(lines)
    assert "| W4A8 | per-step (Q-Diffusion/BRECQ) | 0,1 | 0.00300 ± 0.00141 |" in text
    assert "| W4A8 | AccuQuant (shipped recipe) | 0,1 | 0.00150 ± 0.00071 |" in text and "| 0.50 [0.50, 0.50] * |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# Tool\n\n{README_START}\nold table\n{README_END}\n\n## Next section\n")
    write_section(readme, lines)
    written = readme.read_text()
    assert "old table" not in written and written.count(README_START) == 1
    assert written.startswith("# Tool\n\n") and written.endswith("\n\n## Next section\n")
