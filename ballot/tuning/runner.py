"""One call that runs a study to its budget and writes its outputs (used by `ballot tune` and the tune stage)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from ballot.config import ExperimentConfig, to_dict
from ballot.data import DataBundle
from ballot.pruning import DenseArtifacts
from ballot.tracking import connect, resolve_tracking_uri
from ballot.tuning.kept import keep_only
from ballot.tuning.mlflow_runs import PARENT_ATTR, TrialLogger, end_abandoned_parent, finish_parent, start_parent
from ballot.tuning.objective import dense_val_accuracy, thin_validation_warning
from ballot.tuning.report import choose, no_choice_reason, write_report
from ballot.tuning.space import OBJECTIVE_WEIGHT_KEY, check_space, trial_base, write_best
from ballot.tuning.study import (
    DENSE_ACC_ATTR,
    WorkerJob,
    enqueue_baseline,
    fingerprint,
    make_storage,
    open_study,
    others_running,
    outside_space,
    redact,
    run_workers,
    sqlite_url,
    work,
)

RULES = {
    "single": "highest val acc - mcd_weight * val MCD among feasible complete trials",
    "multi": "lowest val CWV on the feasible Pareto front (val acc up, val CWV down); ties: higher val acc",
}


@dataclass
class TuneOutcome:
    """A finished (or timed-out) study and what was written for it."""

    study: optuna.Study
    chosen: FrozenTrial | None
    summary: dict[str, Any]
    files: list[Path]


def run_study(cfg: ExperimentConfig, data: DataBundle, dense: DenseArtifacts, *, dense_dir: str | Path,
              best_path: str | Path, report_dir: str | Path, default_storage: str | Path,
              snapshot: str | Path | None = None, tracking_uri: str | None = None,
              keep_dir: str | Path | None = None) -> TuneOutcome:
    """Create or join the study of ``cfg.tune``, run ``tune.workers`` workers until it holds ``tune.n_trials``
    finished trials (or ``tune.timeout_s`` passes), then write best_params.yaml and the report.

    ``dense_dir`` holds ``dense`` as files (spawned workers load it); ``snapshot`` is the data snapshot workers
    load (None: they load the configured dataset); ``default_storage`` is the sqlite file used when
    ``tune.storage`` is null; ``tracking_uri`` overrides MLflow's (else MLFLOW_TRACKING_URI, else register's);
    ``keep_dir``, when given, keeps the trial models and ends with only the chosen one's (ballot.tuning.kept).
    """
    knobs = check_space(cfg)
    warning = thin_validation_warning(data.val.y, data.class_names)
    if warning:
        print(warning, file=sys.stderr)
    base = trial_base(cfg)
    outside = outside_space(base, knobs)
    if outside:
        print(f"tune: no baseline trial: the configured {', '.join(outside)} lie outside the search space, so the "
              f"study reports no comparison with Ballot's own settings", file=sys.stderr)
    tune = base.tune
    storage_url = tune.storage or sqlite_url(default_storage)
    fp = fingerprint(base, dense)
    name = tune.study_name or f"ballot-{fp[:12]}"
    uri = resolve_tracking_uri(base.register.tracking_uri, tracking_uri)
    client = connect(uri)

    def initialise(study: optuna.Study) -> None:
        study.set_user_attr(DENSE_ACC_ATTR, dense_val_accuracy(base, data, dense))
        enqueue_baseline(study, base, knobs)  # trial 0: Ballot's configured values
        start_parent(client, tune.experiment, study, redact(storage_url), to_dict(base))

    storage = make_storage(storage_url, tune.heartbeat_s, on_stale=TrialLogger(client))
    study, created = open_study(base, storage, name, fp, worker=0, on_create=initialise,
                                on_abandon=lambda attrs: end_abandoned_parent(client, attrs.get(PARENT_ATTR)))
    # The creator's workers take offsets 0, 1, ...; so does a process that resumes a study no one else is running,
    # which then suggests what one uninterrupted run would have. A process joining a study that others are running
    # takes an offset from its pid, so that it never replays another process's suggestions.
    offset = 0 if created or not others_running(study) else 1000 + os.getpid()
    job = WorkerJob(to_dict(base), storage_url, name, fp, str(dense_dir), str(snapshot) if snapshot else None, uri,
                    offset, str(keep_dir) if keep_dir is not None else None)
    if tune.workers == 1:
        work(job, data, dense)
    else:
        run_workers(job, tune.workers, study, tune.n_trials)

    chosen = choose(study)
    if keep_dir is not None:
        keep_only(keep_dir, chosen.number if chosen else None)
    summary, files = write_report(study, tune.n_trials, chosen, Path(report_dir))
    info = {"study": name, "storage": redact(storage_url), "mode": tune.mode, "rule": RULES[tune.mode],
            "trial": chosen.number if chosen else None, "metrics": summary["best"],
            "dense_val_acc": summary["dense_val_acc"]}
    if chosen is None:
        info["note"] = f"{no_choice_reason(summary, tune.max_acc_drop)}. params is empty, so prune keeps its own values"
    # the trials' objective weight rides along (a searched one wins): under refine_start 'best' it picks the kept
    # training, so prune reproduces the chosen trial only with the same weight
    chosen_values = {OBJECTIVE_WEIGHT_KEY: tune.mcd_weight, **chosen.params} if chosen else {}
    best = write_best(best_path, chosen_values, info)
    finish_parent(client, study.user_attrs[PARENT_ATTR], summary, [best, *files])
    return TuneOutcome(study, chosen, summary, [best, *files])
