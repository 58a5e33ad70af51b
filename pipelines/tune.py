"""Stage tune: an Optuna study over Ballot's knobs on the dense model -> best_params.yaml (for prune) and a report.

The study lives in ``tune.storage`` (default artifacts/tune/study.db, which persists between runs), so a killed
run resumes where it stopped; the report folder is replaced only when the stage succeeds. Trial models are kept in
``artifacts/tune/chosen``, which persists with the study (each trial's folder appears complete or not at all, and
only the chosen one stays); prune reuses it when it would train the same model (ballot.tuning.kept).
"""

from __future__ import annotations

from ballot.config import ExperimentConfig
from ballot.errors import ConfigError
from ballot.experiment import check_fits, load_dense
from ballot.snapshot import load_snapshot
from ballot.storage import staged_folder
from ballot.tuning.runner import run_study
from pipelines.common import BEST_PARAMS, DATA, DENSE, STUDY_DB, TUNE_CHOSEN, TUNE_REPORT, run_stage


def main(cfg: ExperimentConfig) -> None:
    if cfg.tune.storage is not None:
        raise ConfigError(f"tune.storage: the pipeline's tune stage keeps its study in {STUDY_DB}, a DVC output; "
                          f"leave it null here and share a study between machines with `ballot tune --storage URL`")
    data = load_snapshot(DATA)
    check_fits(cfg, data)
    dense = load_dense(DENSE)
    with staged_folder(TUNE_REPORT) as folder:
        outcome = run_study(cfg, data, dense, dense_dir=DENSE, best_path=BEST_PARAMS, report_dir=folder,
                            default_storage=STUDY_DB, snapshot=DATA, keep_dir=TUNE_CHOSEN)
    summary, trials = outcome.summary, outcome.summary["trials"]
    best = summary["best"] or {}
    print(f"tune: study {summary['study']}  {trials['finished']} trials ({trials['pruned']} pruned, "
          f"{trials['infeasible']} infeasible)  best trial {best.get('number')}  objective "
          f"{best.get('objective', float('nan')):.4f} -> {BEST_PARAMS}, {TUNE_REPORT}")


if __name__ == "__main__":
    run_stage("tune", main)
