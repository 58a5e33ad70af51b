"""A `ballot tune` process killed with SIGKILL mid-trial, then resumed on the same storage (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, OperationalError

from ballot.experiment import save_dense
from ballot.tuning.study import sqlite_url
from tests.conftest import tiny_config
from tests.proc import children, needs_proc_children, survivors
from tests.test_tune import TUNE_FLAGS

pytestmark = pytest.mark.slow

# Trials of a few seconds each, so that the test can catch one running and kill it.
LONG_SPACE = {"prune.ballot.conflict_threshold": {"type": "float", "low": 0.1, "high": 2.0, "log": True},
              "prune.ballot.refine_train.epochs": {"type": "int", "low": 150, "high": 200}}
# Trials long enough to be caught running, short enough for a study of several of them.
MID_SPACE = {**LONG_SPACE, "prune.ballot.refine_train.epochs": {"type": "int", "low": 20, "high": 30}}
STUDY = "killed"
# The killed-worker study beats every 10 s (grace 20 s), so the test's short stops of a worker never look fatal.
HEARTBEAT_S, STOP_S = 10, 3.0


def _finished(study: optuna.Study) -> dict[int, tuple]:
    return {t.number: (t.state.name, t.values, tuple(sorted(t.params.items())))
            for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}


def _load(storage: str, timeout: float = 60.0) -> optuna.Study:
    """The study, retried while the worker holds the sqlite file locked (a busy machine makes that likely) or is
    still creating its schema (opening it then races the worker's stamp of the schema version: IntegrityError)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return optuna.load_study(study_name=STUDY, storage=storage)
        except (OperationalError, IntegrityError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wait_for_a_trial_mid_run(process: subprocess.Popen, database: Path, log: Path, timeout: float) -> int:
    """The number of a RUNNING trial that has reported at least one epoch, once another trial has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the study ended before it could be killed:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
        if not database.is_file():
            continue
        try:
            study = _load(sqlite_url(database))
        except KeyError:  # not created yet
            continue
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        if running and any(t.state.is_finished() for t in trials):
            return running[0].number
    raise AssertionError("no trial was seen running")


def test_sigkill_mid_trial_then_resume_reaches_the_exact_count(tmp_path, tiny_dense):
    out, dense = tmp_path / "tune", tmp_path / "dense"
    save_dense(tiny_dense, dense, tiny_config())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flags = [*TUNE_FLAGS, "--set", f"tune.space={json.dumps(LONG_SPACE)}"]
    command = [sys.executable, "-m", "ballot.cli", "tune", *flags, "--out", str(out), "--dense", str(dense),
               "--n-trials", "3", "--study-name", STUDY, "--tracking-uri", uri]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    storage = sqlite_url(out / "study.db")

    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            victim = _wait_for_a_trial_mid_run(process, out / "study.db", tmp_path / "killed.log", timeout=240)
            before = _finished(_load(storage))
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert optuna.load_study(study_name=STUDY, storage=storage).trials[victim].state == TrialState.RUNNING

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.trials
    after = _finished(study)
    assert len(after) == 3, "exactly the requested number of finished trials"
    assert all(after[number] == row for number, row in before.items()), "finished trials are kept as they were"
    assert trials[victim].state == TrialState.FAIL, "the killed trial is recorded as failed"
    assert [t.state for t in trials].count(TrialState.FAIL) == 1 and len(trials) == 4
    assert sorted(t.number for t in trials) == list(range(4))
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["trials"]["finished"] == 3 and summary["trials"]["failed"] == 1

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("ballot-tune")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`optuna.trial` = '{victim}'")
    assert [(r.info.status, r.data.tags["optuna.state"]) for r in runs] == [("FAILED", "FAIL")]


def _kill_the_worker_of_a_running_trial(process: subprocess.Popen, database: Path, log: Path) -> int:
    """SIGKILL the worker process (not the command) of a trial that is still RUNNING at the kill: the worker is
    stopped first and the trial's state read again, so a trial that finished meanwhile is not taken for the victim.
    A worker stopped while it holds the sqlite file's lock is let go on, and the next trial tried; a stop lasts STOP_S
    plus at most one sqlite busy wait (5 s), well within the study's grace period, so no peer fails its trial."""
    while True:
        victim = _wait_for_a_trial_mid_run(process, database, log, timeout=240)
        worker_pid = int(_load(sqlite_url(database)).trials[victim].user_attrs["worker"].split(":")[-1])
        os.kill(worker_pid, signal.SIGSTOP)
        try:
            running = _load(sqlite_url(database), timeout=STOP_S).trials[victim].state == TrialState.RUNNING
        except (OperationalError, IntegrityError):  # stopped mid-write: the file stays locked until it goes on
            running = False
        if running:
            os.kill(worker_pid, signal.SIGKILL)
            return victim
        os.kill(worker_pid, signal.SIGCONT)


def test_a_killed_worker_is_replaced_and_the_completed_study_is_reported(tmp_path, tiny_dense):
    out, dense = tmp_path / "tune", tmp_path / "dense"
    save_dense(tiny_dense, dense, tiny_config())
    command = [sys.executable, "-m", "ballot.cli", "tune", *TUNE_FLAGS, "--set", f"tune.space={json.dumps(MID_SPACE)}",
               "--set", f"tune.heartbeat_s={HEARTBEAT_S}", "--out", str(out), "--dense", str(dense), "--n-trials", "3",
               "--workers", "2", "--study-name", STUDY, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = tmp_path / "workers.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            victim = _kill_the_worker_of_a_running_trial(process, out / "study.db", log)
            process.wait(timeout=400)
        finally:
            process.kill()
            process.wait()
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    assert "warning: worker process(es) failed: tune-worker-" in output and "(exit code -9)" in output

    study = optuna.load_study(study_name=STUDY, storage=sqlite_url(out / "study.db"))
    assert study.trials[victim].state == TrialState.FAIL and len(_finished(study)) == 3, "the survivor replaced it"
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["trials"]["finished"] == 3 and summary["trials"]["failed"] == 1
    assert (out / "best_params.yaml").is_file()


@needs_proc_children
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_ballot_tune_alone_stops_its_workers(tmp_path, tiny_dense, signal_number):
    """`kill -INT` or `kill -TERM` of `ballot tune --workers 2`: no worker runs trials on after it."""
    out, dense = tmp_path / "tune", tmp_path / "dense"
    save_dense(tiny_dense, dense, tiny_config())
    command = [sys.executable, "-m", "ballot.cli", "tune", *TUNE_FLAGS, "--set", f"tune.space={json.dumps(MID_SPACE)}",
               "--out", str(out), "--dense", str(dense), "--n-trials", "50", "--workers", "2", "--study-name", STUDY,
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    log = tmp_path / "workers.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_a_trial_mid_run(process, out / "study.db", log, timeout=240)
            workers = children(process.pid)
            os.kill(process.pid, signal_number)
            process.wait(timeout=120)
        finally:
            process.kill()
            process.wait()
    left = survivors(workers, within_s=30)
    assert len(workers) >= 2 and left == [], log.read_text()[-3000:]
    if signal_number == signal.SIGINT:
        assert process.returncode == 130 and log.read_text().count("ballot: interrupted") == 1, log.read_text()[-3000:]
