#!/usr/bin/env bash
# The min_steps study: LTH and Ballot at every default, with the schedules' min_steps floors as shipped (500 optimiser
# steps a phase) and switched off (min_steps 0: the 20 epochs as given), on four small held-out cells, seeds 0-2.
# Resumable (a finished run is skipped).  Usage: reports/min_steps/run.sh OUT   (about an hour on 2 cores)
set -euo pipefail
out=${1:?usage: run.sh OUT}
cd "$(dirname "$0")/../.."
.venv/bin/python reports/min_steps/make_data.py "$out/data" > /dev/null
unfloored=()
for schedule in train_dense prune.retrain prune.ballot.refine_train; do unfloored+=(--set "$schedule.min_steps=0"); done
run() {  # run ARM CELL SEED METHOD ballot-prune-flags...
  local dir="$out/$1/$2_$3_$4"; mkdir -p "$out/$1"; shift 4
  [ -f "$dir/metrics.json" ] && return
  # the start these runs were recorded with (refine_start 'best' became the default later; reports/refine_start/)
  .venv/bin/ballot prune "$@" --set prune.ballot.refine_start=rewind --out "$dir" > "$dir.log" 2>&1 || echo "failed: $dir (see $dir.log)"
}
long_digits=(--dataset digits --set data.imbalance_ratio=10 --set data.val_fraction=0.2)
for arm in floored unfloored; do
  extra=(); [ "$arm" = unfloored ] && extra=("${unfloored[@]}")
  for seed in 0 1 2; do for method in lth ballot; do
    common=(--method "$method" --seed "$seed" --device cpu "${extra[@]}")
    run "$arm" digits-lt-cnn "$seed" "$method" "${long_digits[@]}" --model cnn --density 0.02 "${common[@]}" \
      --dense "$out/$arm/dense_digits-lt-cnn_$seed"
    run "$arm" s20lt-cnn "$seed" "$method" --dataset npz --set "data.path=$out/data/s20lt.npz" --model cnn \
      "${common[@]}" --dense "$out/$arm/dense_s20lt-cnn_$seed"
    run "$arm" c10-cnn "$seed" "$method" --dataset npz --set "data.path=$out/data/c10.npz" --model cnn \
      "${common[@]}" --dense "$out/$arm/dense_c10-cnn_$seed"
    run "$arm" digits-lt-mlp "$seed" "$method" "${long_digits[@]}" --model mlp --density 0.02 "${common[@]}" \
      --dense "$out/$arm/dense_digits-lt-mlp_$seed"
  done; done
done
.venv/bin/python reports/min_steps/summarize.py "$out"
