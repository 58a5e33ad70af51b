#!/usr/bin/env bash
# The studies of this folder (README.md): `bash reports/tuning_guard/run.sh OUT` from the repository root.
# Each is reports/heldout_checks/tuned.py: per seed, Ballot at its defaults, a 20-trial study with the guard off
# (tune.min_win_confidence=0, so the study's pick is its best trial) and Ballot with that pick. Every trial stores
# its per-sample validation record, which analyse.py reads. Each step skips what OUT holds.
set -euo pipefail
out=${1:?usage: run.sh OUT}
py=.venv/bin/python
tuned=($py reports/heldout_checks/tuned.py "$out")
off=(--set tune.min_win_confidence=0 --set data.val_fraction=0.2)
[ -f "$out/data/tab20lt.npz" ] || $py reports/heldout_checks/make_data.py "$out/data"
"${tuned[@]}" tab20lt -- --dataset npz --set "data.path=$out/data/tab20lt.npz" --model mlp "${off[@]}"
"${tuned[@]}" fmnist-lt100-mlp -- --dataset fashion-mnist --model mlp --set data.imbalance_ratio=100 \
  --set data.max_train_samples=12000 "${off[@]}"
"${tuned[@]}" digits-lt-mlp -- --dataset digits --model mlp --set data.imbalance_ratio=10 "${off[@]}"
"${tuned[@]}" fmnist-lt10-mlp -- --dataset fashion-mnist --model mlp --set data.imbalance_ratio=10 \
  --set data.max_train_samples=12000 "${off[@]}"
"${tuned[@]}" fmnist-mlp -- --dataset fashion-mnist --model mlp --set data.imbalance_ratio=1 \
  --set data.max_train_samples=12000 "${off[@]}"
