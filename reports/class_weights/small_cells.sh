#!/usr/bin/env bash
# Ballot with class_weight_prior_images=10 on the min_steps study's small cells (floored), on its dense models, to
# compare with its Ballot runs (K = 0). Usage: reports/class_weights/small_cells.sh MIN_STEPS_OUT OUT
# (MIN_STEPS_OUT: the folder reports/min_steps/run.sh filled; resumable; about 30 minutes on 2 cores)
set -euo pipefail
ms=${1:?usage: small_cells.sh MIN_STEPS_OUT OUT}; out=${2:?usage: small_cells.sh MIN_STEPS_OUT OUT}
cd "$(dirname "$0")/../.."
mkdir -p "$out"
run() {  # run CELL SEED ballot-prune-flags...
  local dir="$out/$1_$2_ballot"; shift 2
  [ -f "$dir/metrics.json" ] && return
  # refine_start rewind: the start these runs were recorded with ('best' became the default later)
  .venv/bin/ballot prune --method ballot --device cpu --set prune.ballot.class_weight_prior_images=10 \
    --set prune.ballot.refine_start=rewind --out "$dir" \
    "$@" > "$dir.log" 2>&1 || echo "failed: $dir (see $dir.log)"
}
long_digits=(--dataset digits --set data.imbalance_ratio=10 --set data.val_fraction=0.2)
dense="$ms/floored/dense"
for seed in 0 1 2; do
  run digits-lt-mlp "$seed" "${long_digits[@]}" --model mlp --density 0.02 --seed "$seed" \
    --dense "${dense}_digits-lt-mlp_$seed"
  run digits-lt-cnn "$seed" "${long_digits[@]}" --model cnn --density 0.02 --seed "$seed" \
    --dense "${dense}_digits-lt-cnn_$seed"
  run s20lt-cnn "$seed" --dataset npz --set "data.path=$ms/data/s20lt.npz" --model cnn --seed "$seed" \
    --dense "${dense}_s20lt-cnn_$seed"
  run c10-cnn "$seed" --dataset npz --set "data.path=$ms/data/c10.npz" --model cnn --seed "$seed" \
    --dense "${dense}_c10-cnn_$seed"
done
.venv/bin/python reports/class_weights/small_cells.py "$ms/floored" "$out"
