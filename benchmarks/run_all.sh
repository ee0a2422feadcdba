#!/usr/bin/env bash
# Regenerates every figure in docs/results.md: the quality table (W8A8/W4A8/W4A4 x FP/RTN/per-step/AccuQuant),
# the group-size and gradient-mode ablations, the equal-compute per-step row, then FID columns and plots.
# Takes ~2 hours on 2 CPU cores.  Usage: bash benchmarks/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=docs/results
python benchmarks/quality.py --bits w4a8 --out $R/quality_w4a8.json
python benchmarks/quality.py --bits w8a8,w4a4 --out $R/quality_w8a8_w4a4.json
python benchmarks/quality.py --bits w4a8 --methods accuquant --group-sizes 1,2,8 --out $R/ablation_group_size.json
python benchmarks/quality.py --bits w4a8 --methods accuquant --gradients exact,approx,stepwise --out $R/ablation_gradient.json
python benchmarks/quality.py --bits w4a8 --methods per_step --iters 200 --out $R/per_step_200_iters.json
python benchmarks/make_results.py
