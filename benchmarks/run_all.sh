#!/usr/bin/env bash
# Regenerates every figure in docs/results.md (the robust protocol: 1024 held-out seeds, batches of 64) and the
# README's main-comparison and peer tables. Each benchmark writes one JSON file of rows in docs/results/ (after
# every row, so an interrupted sweep continues where it stopped); make_protocol_results then writes the page.
# Takes more than 5 hours on 2 CPU cores (core ablation, peers and the UNet main comparison ~5 h, then the DiT
# teacher's; one run at a time).  Usage, from anywhere: bash benchmarks/run_all.sh
# The earlier 128-seed tables (docs/results_128_seeds.md) came from the retired benchmarks/quality.py, runnable
# from git commit 2b51bb5 (git checkout 2b51bb5 && bash benchmarks/run_all.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# RTN core ablation, optimum-quanto against our RTN, and the main multi-seed comparison of the shipped configs
python -m benchmarks.core_ablation --threads 2
python -m benchmarks.peers --threads 2
python -m benchmarks.main_comparison --threads 2
# the second architecture: the class-conditional DiT digits teacher (models/digits-dit, trained by
# configs/pretrain_digits_dit.yaml), RTN / per-step / AccuQuant at W8A8 and W4A8, calibration seeds 0..3
python -m benchmarks.teacher_quality --teacher models/digits-dit --class-conditional --grid models/digits-dit/samples.png
python -m benchmarks.main_comparison --threads 2 --teacher dit
python -m benchmarks.make_protocol_results   # docs/results.md and the README's main-comparison and peer tables
