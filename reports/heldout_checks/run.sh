#!/usr/bin/env bash
# The held-out checks of this folder (README.md): `bash reports/heldout_checks/run.sh OUT` from the repository root.
# Each line skips what OUT already holds, so a killed run continues where it stopped. About 100 minutes on 2 cores,
# plus about 70 for the resnet18 cell. compare_methods.py runs the product's defaults: since refine_start 'best'
# became the default, add --set prune.ballot.refine_start=rewind to compare() for the runs recorded in results/.
set -euo pipefail
out=${1:?usage: run.sh OUT}
py=.venv/bin/python
methods=(lth "lth + refined" ballot)
compare() {  # compare NAME --set ... : three seeds of LTH, LTH + refined and Ballot at density 0.05
  local name=$1; shift
  [ -f "$out/$name/compare.json" ] || $py benchmarks/compare_methods.py --params params.yaml --seeds 0 1 2 \
    --methods "${methods[@]}" --set data.val_fraction=0.2 "$@" --out "$out/$name"
}
# the matrix pins the rewound start: 'ballot (blend)' was the product's Ballot then, 'ballot (blend) best' is now
$py benchmarks/matrix.py --params params.yaml --out "$out/digits" --datasets digits --models mlp cnn \
  --densities 0.01 0.2 --seeds 0 1 2 --workers 2 \
  --methods lth "lth + refined" "ballot (blend)" "lth + refined best" "ballot (blend) best"
$py reports/heldout_checks/make_data.py "$out/data"
for name in cancer wine tab20lt; do
  compare "$name" --set base.dataset=npz --set "data.path=$out/data/$name.npz" --set base.model=mlp \
    --set data.imbalance_ratio=1
done
for model in mlp cnn; do
  compare "fmnist-lt100-$model" --set base.model=$model --set data.imbalance_ratio=100 \
    --set data.max_train_samples=12000
done
for model in resnet20 vgg resnet18; do
  compare "digits-lt-$model" --set base.dataset=digits --set base.model=$model --set data.imbalance_ratio=10
done
# A 20-trial Optuna study per seed against Ballot's defaults (tuned.py), on the two fast long-tailed cells
tuned=(.venv/bin/python reports/heldout_checks/tuned.py "$out/tuned")
"${tuned[@]}" tab20lt -- --dataset npz --set "data.path=$out/data/tab20lt.npz" --model mlp --set data.val_fraction=0.2
"${tuned[@]}" fmnist-lt100-mlp -- --dataset fashion-mnist --model mlp --set data.imbalance_ratio=100 \
  --set data.max_train_samples=12000 --set data.val_fraction=0.2
