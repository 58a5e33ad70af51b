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
from ballot.storage import staged_folder, write_json
from ballot.tuning.runner import run_study
from ballot.tuning.space import write_best
from pipelines.common import BEST_PARAMS, DATA, DENSE, STUDY_DB, TUNE_CHOSEN, TUNE_REPORT, run_stage


def main(cfg: ExperimentConfig) -> None:
    if cfg.tune.storage is not None:
        raise ConfigError(f"tune.storage: the pipeline's tune stage keeps its study in {STUDY_DB}, a DVC output; "
                          f"leave it null here and share a study between machines with `ballot tune --storage URL`")
    if cfg.prune.method != "ballot" and not (cfg.sweep.densities and "ballot" in cfg.sweep.methods):
        skip(f"prune.method is {cfg.prune.method!r} and the sweep draws no Ballot curve; the study tunes Ballot")
        return
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


def skip(reason: str) -> None:
    """No study: the stage's outputs say why, and the study and kept trial model of an earlier run stay (switching
    back to Ballot resumes that study and may reuse that model)."""
    STUDY_DB.parent.mkdir(parents=True, exist_ok=True)
    STUDY_DB.touch()  # an empty file is an empty sqlite database
    TUNE_CHOSEN.mkdir(parents=True, exist_ok=True)
    with staged_folder(TUNE_REPORT) as folder:
        write_json(folder / "summary.json", {"skipped": reason})
    write_best(BEST_PARAMS, {}, {"skipped": reason})
    print(f"tune: skipped ({reason}) -> {BEST_PARAMS}, {TUNE_REPORT}")


if __name__ == "__main__":
    run_stage("tune", main)
