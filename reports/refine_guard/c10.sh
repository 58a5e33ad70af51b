#!/usr/bin/env bash
# The guard as a safety net on the min_steps study's c10-cnn cell (217 training images, 23 validation images: the
# class weights are mostly noise and the refined training predicts one class; reports/min_steps/). Ballot at every
# default, with and without prune.ballot.refine_guard, on the same dense models, seeds 0-2, one run after another.
# Resumable.  Usage: reports/refine_guard/c10.sh OUT   (about 25 minutes on 2 cores)
set -euo pipefail
out=${1:?usage: c10.sh OUT}
cd "$(dirname "$0")/../.."
.venv/bin/python reports/min_steps/make_data.py "$out/data" > /dev/null
run() {  # run NAME SEED ballot-prune-flags...
  local dir="$out/$1_$2"; shift 2
  [ -f "$dir/metrics.json" ] && return
  # the start these runs were recorded with (refine_start 'best' became the default later; reports/refine_start/)
  .venv/bin/ballot prune "$@" --set prune.ballot.refine_start=rewind --out "$dir" > "$dir.log" 2>&1 || echo "failed: $dir (see $dir.log)"
}
for seed in 0 1 2; do
  common=(--method ballot --seed "$seed" --device cpu --dataset npz --set "data.path=$out/data/c10.npz" --model cnn
          --dense "$out/dense_$seed")
  run ballot "$seed" "${common[@]}"  # trains and keeps the dense model the guarded run reuses
  run guard "$seed" "${common[@]}" --set prune.ballot.refine_guard=true
done
