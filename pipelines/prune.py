"""Stage prune: the configured method on the dense states -> mask, sparse model, details (Ballot: vote history)."""

from __future__ import annotations

from dataclasses import asdict

from ballot.config import ExperimentConfig
from ballot.experiment import load_dense, model_metrics, run_prune, save_pruned, timed
from ballot.snapshot import load_snapshot
from ballot.storage import staged_folder, write_json
from ballot.tuning.space import apply_best
from pipelines.common import BEST_PARAMS, DATA, DENSE, PRUNE, run_stage


def main(cfg: ExperimentConfig) -> None:
    cfg, tuned = apply_best(cfg, BEST_PARAMS)  # the tune stage's choice (tune.use_best; Ballot only)
    if tuned:
        print(f"prune: applying {len(tuned)} tuned value(s) from {BEST_PARAMS}")
    data = load_snapshot(DATA)
    dense = load_dense(DENSE)
    result, seconds = timed(run_prune, cfg, data, dense)
    metrics = model_metrics(result.model, data, cfg.base.device)
    metrics.update(method=cfg.prune.method, density=result.mask.density(), target_density=cfg.base.density,
                   seconds=seconds)
    report = [{**asdict(layer), "density": layer.density} for layer in result.mask.report()]
    with staged_folder(PRUNE) as folder:
        save_pruned(folder, result, metrics, cfg, tuned_params=tuned)
        write_json(folder / "mask_report.json", report)
    print(f"prune: {cfg.prune.method}  acc {metrics['acc']:.4f}  cwv {metrics['cwv']:.5f}  mcd {metrics['mcd']:.4f}  "
          f"density {metrics['density']:.4f}  ({seconds:.1f}s) -> {PRUNE}")


if __name__ == "__main__":
    run_stage("prune", main)
