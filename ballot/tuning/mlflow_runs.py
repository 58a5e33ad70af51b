"""MLflow layout of a study: one parent run per study, one nested run per trial, logged by our own callback.

The parent run is created once, by the process that creates the study, and its id is kept in the study's user
attributes, so every worker (also on other machines) nests its trials under it. A nested run carries the trial's
params, its validation metrics and objective, the per-epoch intermediate objective, and the Optuna state as the tag
``optuna.state`` (run status: FINISHED for COMPLETE, KILLED for PRUNED, FAILED for FAIL).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from ballot.tracking import flatten, git_state, numeric_metrics
from ballot.tuning.objective import SURPLUS

PARENT_ATTR = "mlflow_parent_run_id"
STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
TRIAL_METRICS = ("objective", "val_acc", "val_cwv", "val_mcd", "val_worst_class", "epochs_run", "epochs_planned")


def experiment_id(client: Any, name: str) -> str:
    """The id of MLflow experiment ``name``, created when absent (another worker may win the race)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def start_parent(client: Any, experiment: str, study: optuna.Study, storage: str, params: Mapping[str, Any]) -> str:
    """Create the study's parent run (left RUNNING until the study is reported), note its id in the study's user
    attributes before anything else can fail, log ``params`` on it, and return its id."""
    from mlflow.entities import Param

    tags = {"optuna.study": study.study_name, "optuna.storage": storage, **git_state()}
    run = client.create_run(experiment_id(client, experiment), run_name=study.study_name, tags=tags)
    study.set_user_attr(PARENT_ATTR, run.info.run_id)  # so that an abandoned set-up can end it (end_abandoned_parent)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flatten(params).items()])
    return run.info.run_id


def end_abandoned_parent(client: Any, run_id: str | None) -> None:
    """End the parent run of a study whose set-up never finished (deleted: an error, or its creator killed) as
    KILLED, unless it already ended; None: the set-up stopped before it had one."""
    if run_id is not None and client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status="KILLED")


class TrialLogger:
    """Optuna callback (also the storage's heartbeat-stale callback): one nested MLflow run per finished trial."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._experiments: dict[str, str] = {}

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(SURPLUS) or trial.state not in STATUS:
            return
        parent = study.user_attrs.get(PARENT_ATTR)
        if parent is None:
            raise RuntimeError(f"study '{study.study_name}' has no MLflow parent run ({PARENT_ATTR} is not set)")
        if parent not in self._experiments:
            self._experiments[parent] = self.client.get_run(parent).info.experiment_id
        tags = {"mlflow.parentRunId": parent, "optuna.study": study.study_name, "optuna.trial": str(trial.number),
                "optuna.state": trial.state.name, "worker": str(trial.user_attrs.get("worker", "unknown"))}
        run_id = self.client.create_run(self._experiments[parent], run_name=f"trial-{trial.number}",
                                        tags=tags).info.run_id
        self.client.log_batch(run_id, metrics=_trial_metrics(trial), params=_trial_params(trial))
        self.client.set_terminated(run_id, STATUS[trial.state])


def _trial_params(trial: FrozenTrial) -> list[Any]:
    from mlflow.entities import Param

    return [Param(key, str(value)) for key, value in trial.params.items()]


def _trial_metrics(trial: FrozenTrial) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {key: trial.user_attrs[key] for key in TRIAL_METRICS if key in trial.user_attrs}
    if "feasible" in trial.user_attrs:
        values["feasible"] = float(trial.user_attrs["feasible"])
    if trial.datetime_start and trial.datetime_complete:
        values["seconds"] = (trial.datetime_complete - trial.datetime_start).total_seconds()
    metrics = [Metric(key, value, now, 0) for key, value in numeric_metrics(values).items()]
    metrics += [Metric("val_objective_by_epoch", float(value), now, int(step))
                for step, value in sorted(trial.intermediate_values.items())]
    return metrics


def finish_parent(client: Any, run_id: str, summary: Mapping[str, Any], files: list[Path]) -> None:
    """Log the study summary and output files on the parent run and mark it FINISHED."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in numeric_metrics(summary).items()])
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
