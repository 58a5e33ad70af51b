"""Stage train_dense: theta_0 -> theta_T on the snapshot, keeping the rewind state theta_k."""

from __future__ import annotations

import sys

from ballot.config import ExperimentConfig
from ballot.experiment import (check_fits, model_metrics, notices_before_training, save_dense, timed, train_dense,
                               weak_dense_warning)
from ballot.snapshot import load_snapshot
from ballot.storage import staged_folder, write_json
from pipelines.common import DATA, DENSE, run_stage


def main(cfg: ExperimentConfig) -> None:
    data = load_snapshot(DATA)
    check_fits(cfg, data)
    for line in notices_before_training(cfg, data):
        print(line, file=sys.stderr)
    (model, dense, result), seconds = timed(train_dense, cfg, data)
    metrics = {**model_metrics(model, data, cfg.base.device), "seconds": seconds}
    with staged_folder(DENSE) as folder:
        save_dense(dense, folder, cfg, data)  # with dense.json, so `--dense artifacts/dense` can be checked
        write_json(folder / "metrics.json", metrics)
        write_json(folder / "history.json", result.history)
    print(f"train_dense: acc {metrics['acc']:.4f}  cwv {metrics['cwv']:.5f}  mcd {metrics['mcd']:.4f}  "
          f"({seconds:.1f}s) -> {DENSE}")
    warning = weak_dense_warning(metrics["val"])
    if warning:
        print(warning, file=sys.stderr)


if __name__ == "__main__":
    run_stage("train_dense", main)
