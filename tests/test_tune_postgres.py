"""Several worker processes on one PostgreSQL-backed study: `ballot tune --workers 2` plus a plain second
`ballot tune` joining the same study. PostgreSQL comes from scripts/postgres.sh (a throwaway cluster on localhost),
or from BALLOT_TEST_POSTGRES_URL; the test is skipped, with the reason, when neither is possible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ballot.experiment import save_dense
from tests.conftest import tiny_config
from tests.test_tune import TUNE_FLAGS

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"
SPACE = {"prune.ballot.conflict_threshold": {"type": "float", "low": 0.1, "high": 2.0, "log": True},
         "prune.ballot.refine_train.epochs": {"type": "int", "low": 60, "high": 100}}
N_TRIALS = 8


@pytest.fixture(scope="module")
def postgres_url():
    given = os.environ.get("BALLOT_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    already = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.skip(f"PostgreSQL could not be started by {SCRIPT.name}: {started.stderr.strip()[-500:]}")
    yield started.stdout.strip()
    if not already:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


def _wait_until_ready(storage: str, name: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None or process.returncode == 0, "the first process failed"
        if name in optuna.get_all_study_names(storage) and \
                optuna.load_study(study_name=name, storage=storage).user_attrs.get("ready"):
            return
        time.sleep(0.5)
    raise AssertionError(f"study {name} was not created")


def test_workers_and_a_second_process_share_one_postgres_study(tmp_path, postgres_url, tiny_dense):
    dense = tmp_path / "dense"
    save_dense(tiny_dense, dense, tiny_config())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = f"pg-{uuid.uuid4().hex[:10]}"
    command = [sys.executable, "-m", "ballot.cli", "tune", *TUNE_FLAGS, "--set", f"tune.space={json.dumps(SPACE)}",
               "--dense", str(dense), "--storage", postgres_url, "--study-name", name,
               "--n-trials", str(N_TRIALS), "--tracking-uri", uri]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    logs = [open(tmp_path / f"{label}.log", "w") for label in ("first", "second")]
    try:
        first = subprocess.Popen([*command, "--out", str(tmp_path / "first"), "--workers", "2"], env=env,
                                 stdout=logs[0], stderr=subprocess.STDOUT)
        _wait_until_ready(postgres_url, name, first)
        second = subprocess.Popen([*command, "--out", str(tmp_path / "second")], env=env,
                                  stdout=logs[1], stderr=subprocess.STDOUT)
        codes = [first.wait(timeout=600), second.wait(timeout=600)]
    finally:
        for log in logs:
            log.close()
    assert codes == [0, 0], (tmp_path / "first.log").read_text()[-3000:] + (tmp_path / "second.log").read_text()[-3000:]

    try:
        trials = optuna.load_study(study_name=name, storage=postgres_url).trials
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        lost = [t.number for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")]
        assert len(finished) == N_TRIALS, "exactly the requested total over all workers"
        assert lost == [] and not any(t.state == TrialState.RUNNING for t in trials)
        assert sorted(t.number for t in trials) == list(range(len(trials)))
        # the first process's two workers share the trials; the second joins late, so whether it still finds a
        # trial to run is timing, and what is checked of it is that it joined and reported the whole study (below)
        assert len({t.user_attrs["worker"] for t in finished}) >= 2, "the trials were shared out between workers"
        assert len({tuple(sorted(t.params.items())) for t in finished}) == N_TRIALS, "no configuration ran twice"
        for label in ("first", "second"):  # each process waited for the other's trials, then reported the whole study
            summary = json.loads((tmp_path / label / "report" / "summary.json").read_text())
            assert summary["trials"]["finished"] == N_TRIALS and summary["study"] == name
    finally:
        optuna.delete_study(study_name=name, storage=postgres_url)
