#!/usr/bin/env bash
# Held-out architectures (README.md here): `bash reports/heldout_arch/run.sh OUT` from the repository root.
# Each cell skips what OUT already holds; two cells run at a time, one thread each (about 2 hours on 2 cores).
set -euo pipefail
out=${1:?usage: run.sh OUT}
py=.venv/bin/python
compare() {  # compare NAME SEEDS METHOD... -- --set ... : density 0.05, the product's defaults
  local name=$1 seeds=$2 methods=()
  shift 2
  while [ "$1" != "--" ]; do methods+=("$1"); shift; done
  shift
  # shellcheck disable=SC2086  # SEEDS is a list
  [ -f "$out/$name/compare.json" ] || OMP_NUM_THREADS=1 $py benchmarks/compare_methods.py --params params.yaml \
    --seeds $seeds --methods "${methods[@]}" --set data.val_fraction=0.2 "$@" --out "$out/$name" > "$out/$name.log" 2>&1
}
mkdir -p "$out"
{
  compare fmnist-lt-vit "0 1 2" lth "lth + refined" ballot -- --set base.model=vit --set data.imbalance_ratio=10 \
    --set data.max_train_samples=10000
  compare fmnist-lt-lstm "0 1 2" lth "lth + refined" ballot -- --set base.model=lstm --set data.imbalance_ratio=10 \
    --set data.max_train_samples=10000
  compare digits-lt-lstm "0 1 2" lth "lth + refined" ballot -- --set base.dataset=digits --set base.model=lstm \
    --set data.imbalance_ratio=10
} &
{
  compare digits-lt-vit "0 1 2" lth "lth + refined" ballot -- --set base.dataset=digits --set base.model=vit \
    --set data.imbalance_ratio=10
  # MobileNetV2 costs about eight times the cnn's time per image on these cores: digits only (about an hour)
  compare digits-lt-mobilenet "0 1 2" lth "lth + refined" ballot -- --set base.dataset=digits \
    --set base.model=mobilenet --set data.imbalance_ratio=10
} &
wait
