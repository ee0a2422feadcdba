#!/usr/bin/env bash
# Regenerates every figure in docs/results.md. Each line writes one JSON file of rows (written after every
# row, so an interrupted sweep keeps what it measured); make_results.py then adds the FID columns and plots.
# Every calibrated row uses lr_adaround 1e-2 (the configs' value) unless it is a sensitivity row.
# Takes ~5 hours on 2 CPU cores (one run at a time; independent lines can run in parallel with OMP_NUM_THREADS=1).  Usage: bash benchmarks/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=docs/results
Q="python benchmarks/quality.py --lr-adaround 1e-2"
BLOCK="--methods accuquant --rollout-target block_output --gradients stepwise"   # the digits configs' AccuQuant
# main table: FP, RTN at every width; per-step and AccuQuant (state target n=4, block-output target n=2)
python benchmarks/quality.py --methods rtn --out $R/quality_rtn.json
$Q --bits w4a8 --methods per_step,accuquant --group-sizes 4 --gradients checkpointed --out $R/quality_w4a8.json
$Q --bits w4a8 $BLOCK --group-sizes 2 --out $R/quality_w4a8_accuquant_block.json
$Q --bits w8a8,w4a4 --methods per_step,accuquant --rollout-target block_output --gradients stepwise --group-sizes 2 \
   --out $R/quality_w8a8_w4a4.json
# objective variants and calibration-seed spread (W4A8)
$Q --bits w4a8 $BLOCK --group-sizes 4 --out $R/ablation_objective_block_n4.json
$Q --bits w4a8 $BLOCK --group-sizes 8 --out $R/ablation_objective_block_n8.json
$Q --bits w4a8 --methods accuquant --group-sizes 1 --gradients checkpointed --out $R/ablation_group_size_state_n1.json   # state target n=1
for s in 1 2 3 4 5 6 7 8 9; do
  $Q --bits w4a8 --methods per_step --seed $s --out $R/ablation_objective_per_step_seed$s.json
  $Q --bits w4a8 $BLOCK --group-sizes 2 --seed $s --out $R/ablation_objective_block_n2_seed$s.json
done
$Q --bits w4a8 $BLOCK --group-sizes 4 --seed 1 --out $R/ablation_objective_block_n4_seed1.json
for w in "0 1" "100 1" "1000 1"; do set -- $w
  $Q --bits w4a8 --methods accuquant --group-sizes 4 --state-loss-weight $1 --block-loss-weight $2 \
     --out $R/ablation_objective_ws$1_wb$2.json
done
ACC="--methods accuquant --rollout-target block_accumulated --gradients stepwise"
for s in 0 1 2 3; do
  $Q --bits w4a8 $ACC --group-sizes 2 --seed $s --out $R/ablation_objective_accum_n2_seed$s.json
done
for s in 0 1; do
  $Q --bits w4a8 $ACC --group-sizes 4 --seed $s --out $R/ablation_objective_accum_n4_seed$s.json
done
for s in 0 1 2; do
  $Q --bits w4a8 $BLOCK --group-sizes 2 --later-units quantized --seed $s --out $R/ablation_objective_block_n2_laterq_seed$s.json
done
# mixed-start batches (4 group starts x 4 trajectories per batch instead of one start): lower gradient variance
for s in 0 1 2 3; do
  $Q --bits w4a8 --methods per_step --starts-per-batch 4 --seed $s --out $R/ablation_objective_per_step_mix4_seed$s.json
  $Q --bits w4a8 $BLOCK --group-sizes 2 --starts-per-batch 4 --seed $s --out $R/ablation_objective_block_n2_mix4_seed$s.json
done
# equal compute instead of equal iterations: per-step at 2x the iterations (AccuQuant n=2 runs 2 steps per item)
for s in 0 1 2; do
  $Q --bits w4a8 --methods per_step --iters 100 --seed $s --out $R/per_step_100_iters_seed$s.json
done
# both objectives at 4x the iterations (200 per unit)
for s in 0 1; do
  $Q --bits w4a8 --methods per_step --iters 200 --seed $s --out $R/iters200_per_step_seed$s.json
done
$Q --bits w4a8 $BLOCK --group-sizes 2 --iters 200 --out $R/iters200_block_n2_seed0.json
# the whole-model final stage (200 iterations of the n-step state objective on every activation step size and
# quantized-layer bias after the units): AccuQuant block-output n = 4 and 8, and the per-step baseline (stage n = 1)
for s in 0 1 2 3; do
  $Q --bits w4a8 $BLOCK --group-sizes 4 --final-stage-iters 200 --seed $s --out $R/final_stage_accuquant_n4_seed$s.json
done
$Q --bits w4a8 $BLOCK --group-sizes 8 --final-stage-iters 200 --out $R/final_stage_accuquant_n8_seed0.json
$Q --bits w4a8 --methods per_step --final-stage-iters 200 --out $R/final_stage_per_step_seed0.json
# the stage with its own n = 8 (final_stage_group_size) after per-step-style units (block-output n = 1), with one
# and with four group starts per batch
for s in 0 1 2 3; do
  $Q --bits w4a8 $BLOCK --group-sizes 1 --final-stage-iters 200 --final-stage-group-size 8 --seed $s \
     --out $R/final_stage_n8_blocks_n1_seed$s.json
  $Q --bits w4a8 $BLOCK --group-sizes 1 --starts-per-batch 4 --final-stage-iters 200 --final-stage-group-size 8 \
     --seed $s --out $R/final_stage_n8_blocks_n1_mix4_seed$s.json
done
# the same recipe (the configs' default) at W8A8 and W4A4, seed 0
for b in w8a8 w4a4; do
  $Q --bits $b $BLOCK --group-sizes 1 --final-stage-iters 200 --final-stage-group-size 8 \
     --out $R/final_stage_n8_blocks_n1_$b.json
done
$Q --bits w8a8,w4a4 --methods per_step --final-stage-iters 200 --out $R/final_stage_per_step_w8a8_w4a4.json
# gradient modes of the state target (n=4; checkpointed is in the main table, exact gives its gradient)
for g in approx stepwise; do
  $Q --bits w4a8 --methods accuquant --group-sizes 4 --gradients $g --out $R/ablation_gradient_$g.json
done
# sensitivity of the state target to the rounding regulariser and learning rate (lr 1e-3 rows)
python benchmarks/quality.py --bits w4a8 --out $R/sensitivity_lr1e-3_w4a8.json
python benchmarks/quality.py --bits w4a8 --methods accuquant --rounding-weight 1e-4 --out $R/sensitivity_accuquant_rw1e-4.json
python benchmarks/quality.py --bits w4a8 --methods accuquant --rounding-weight 1e-5 --out $R/sensitivity_accuquant_rw1e-5.json
python benchmarks/quality.py --bits w4a8 --methods per_step --rounding-weight 1e-4 --out $R/sensitivity_per_step_rw1e-4.json
$Q --bits w4a8 --methods accuquant --group-sizes 4 --gradients approx --rounding-weight 1e-4 \
   --out $R/sensitivity_accuquant_approx_rw1e-4.json
# the robust protocol (1024 held-out seeds, batches of 64; docs/results.md "Robust protocol"): RTN core ablation,
# optimum-quanto against our RTN, and the main multi-seed comparison of the shipped configs (~5 h more)
python benchmarks/core_ablation.py --threads 2
python benchmarks/peers.py --threads 2
python benchmarks/main_comparison.py --threads 2
# the second architecture: the class-conditional DiT digits teacher (models/digits-dit, trained by
# configs/pretrain_digits_dit.yaml), RTN / per-step / AccuQuant at W8A8 and W4A8, calibration seeds 0..3
python benchmarks/teacher_quality.py --teacher models/digits-dit --class-conditional --grid models/digits-dit/samples.png
python benchmarks/main_comparison.py --threads 2 --teacher dit
python benchmarks/make_results.py
python benchmarks/make_protocol_results.py   # also the README's main-comparison and peer tables, from their JSON
