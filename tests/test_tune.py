"""ballot.tuning and `ballot tune`: search space, feasibility, budget, pruning, storage, MLflow layout, outputs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from ballot.cli import main
from ballot.config import ExperimentConfig, experiment_from_params, to_dict
from ballot.errors import ConfigError, StorageError, TuneError
from ballot.experiment import load_pruned, run_prune
from ballot.knobs import parse_space
from ballot.pruning import DenseArtifacts
from ballot.tuning.kept import find_kept, prune_recipe
from ballot.tuning.objective import (RAISED, SurplusTrial, TrialContext, claim_slot, dense_val_accuracy, run_trial,
                                     thin_validation_warning)
from ballot.tuning.report import choose, no_choice_reason, pareto_front, summarise
from ballot.tuning.runner import run_study
from ballot.tuning.space import (
    OBJECTIVE_WEIGHT_KEY,
    apply_best,
    check_space,
    current_values,
    load_best,
    trial_base,
    with_values,
    write_best,
)
from ballot.tuning import study as studies
from ballot.tuning.study import (WorkerJob, enqueue_baseline, fingerprint, make_pruner, make_sampler, make_storage,
                                 open_study, outside_space, redact, run_workers, sqlite_url)
from tests.conftest import TINY, tiny_config

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"prune.ballot.conflict_threshold": {"type": "float", "low": 0.1, "high": 2.0, "log": True},
         "prune.ballot.refine_train.epochs": {"type": "int", "low": 2, "high": 4}}
TUNE_FLAGS = ["--dataset", "digits", "--model", "mlp", "--density", "0.1", "--device", "cpu",
              *[flag for item in TINY if not item.startswith("base.") for flag in ("--set", item)],
              "--set", f"tune.space={json.dumps(SPACE)}", "--set", "tune.heartbeat_s=1"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread, as tuning workers use: with other work on the two cores, two threads spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tune_config(*overrides: str) -> ExperimentConfig:
    return tiny_config(f"tune.space={json.dumps(SPACE)}", *overrides)


# --- search space -------------------------------------------------------------------------------------------------

def test_default_space_holds_ballots_defaults_so_trial_0_can_be_the_baseline():
    cfg = ExperimentConfig()
    knobs = check_space(cfg)
    assert {k.key for k in knobs} == set(cfg.tune.space) and all(k.key.startswith("prune.ballot.") for k in knobs)
    defaults = current_values(cfg, knobs)
    assert all(knob.contains(defaults[knob.key]) for knob in knobs), defaults


def test_knob_bounds_and_membership():
    (lr, epochs, schedule) = parse_space({
        "prune.ballot.refine_train.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
        "prune.ballot.refine_train.epochs": {"type": "int", "low": 8, "high": 20, "step": 4},
        "prune.ballot.refine_train.schedule": {"type": "categorical", "choices": ["cosine", "step"]}})
    assert lr.contains(0.05) and not lr.contains(0.2) and not lr.contains("0.05")
    assert epochs.contains(12) and not epochs.contains(14) and not epochs.contains(12.0)
    assert schedule.contains("step") and not schedule.contains("plateau")
    assert epochs.edges() == [8, 20] and schedule.edges() == ["cosine", "step"]


@pytest.mark.parametrize("space, message", [
    (None, "expected a non-empty mapping"),
    ({}, "expected a non-empty mapping"),
    ({"train_dense.rewind_iter": {"type": "int", "low": 100, "high": 900}}, "dense-phase settings"),
    ({"prune.ballot.obs_epochs": {"type": "integer", "low": 1, "high": 3}}, "type: one of"),
    ({"prune.ballot.obs_epochs": {"type": "int", "low": 3, "high": 3}}, r"low \(3\) must be below high \(3\)"),
    ({"prune.ballot.obs_epochs": {"type": "int", "low": 1, "high": 2.5}}, "high: expected a finite integer"),
    ({"prune.ballot.refine_train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "log scale needs low > 0"),
    ({"prune.ballot.refine_train.lr": {"type": "float", "low": 0.1, "high": 1, "stepp": 1}}, r"unknown key\(s\)"),
    ({"prune.ballot.importance": {"type": "categorical", "choices": []}}, "choices: expected a non-empty list"),
    ({"prune.ballot.importance": {"type": "categorical", "choices": ["taylor", "taylor"]}}, "duplicate values"),
])
def test_bad_space_entries_are_named(space, message):
    with pytest.raises(ConfigError, match=message) as info:
        experiment_from_params({"tune": {"space": space}})
    assert str(info.value).startswith("tune.space")


@pytest.mark.parametrize("entry, message", [
    ({"prune.ballot.refine_train.schedule": {"type": "categorical", "choices": ["cosine", "bogus"]}},
     "tune.space.prune.ballot.refine_train.schedule: value 'bogus' is not valid with the other settings"),
    ({"prune.ballot.protect_fraction": {"type": "float", "low": 0.0, "high": 1.5}},
     r"protect_fraction: value 1.5 is not valid with the other settings.*must be in \[0, 1\]"),
    ({"prune.ballot.no_such_knob": {"type": "int", "low": 1, "high": 2}}, r"unknown key\(s\) \['no_such_knob'\]"),
])
def test_space_values_are_checked_against_the_whole_configuration(entry, message):
    with pytest.raises(ConfigError, match=message):
        check_space(tiny_config(f"tune.space={json.dumps(entry)}"))


def test_values_apply_by_dotted_key_and_a_given_space_replaces_the_default():
    cfg = with_values(tune_config(), {"prune.ballot.conflict_threshold": math.inf,
                                      "prune.ballot.refine_train.schedule": "step"})
    assert math.isinf(cfg.prune.ballot.conflict_threshold) and cfg.prune.ballot.refine_train.schedule == "step"
    assert set(cfg.tune.space) == set(SPACE), "a space from params is not merged with the default one"
    assert trial_base(tiny_config("prune.method=lth")).prune.method == "ballot"


def test_best_params_round_trip_and_are_applied_only_when_asked(tmp_path):
    path = tmp_path / "best_params.yaml"
    values = {"prune.ballot.conflict_threshold": 0.25, "prune.ballot.refine_train.epochs": 3}
    write_best(path, values, {"study": "s", "trial": 4})
    assert load_best(path) == values and yaml.safe_load(path.read_text())["trial"] == 4
    tuned, applied = apply_best(tune_config(), path)
    assert applied == values and tuned.prune.ballot.conflict_threshold == 0.25
    assert tuned.prune.ballot.refine_train.epochs == 3
    for off in ("tune.use_best=false", "prune.method=lth"):
        cfg = tune_config(off)
        assert apply_best(cfg, path) == (cfg, {})
    assert apply_best(tune_config(), tmp_path / "absent.yaml")[1] == {}
    path.write_text(yaml.safe_dump({"params": {"train_dense.epochs": 1}}))
    with pytest.raises(ConfigError, match=r"may only set prune.ballot.\* keys"):
        load_best(path)


# --- storage, fingerprint, budget ---------------------------------------------------------------------------------

def test_storage_urls(tmp_path):
    with pytest.raises(ConfigError, match="is not a database URL"):
        make_storage("study.db", heartbeat_s=1)
    assert "secret" not in redact("postgresql://user:secret@db.example:5432/optuna")
    url = sqlite_url(tmp_path / "deep" / "study.db")
    make_storage(url, heartbeat_s=1)
    assert (tmp_path / "deep" / "study.db").is_file(), "the sqlite file and its folder are created"


def test_fingerprint_covers_what_decides_a_trial_and_nothing_else(tiny_dense):
    base = fingerprint(tune_config(), tiny_dense)
    same = ["tune.n_trials=7", "tune.workers=3", "tune.storage=sqlite:///x.db", "tune.timeout_s=5", "base.device=cpu",
            "prune.method=lth", "tune.use_best=false", "tune.heartbeat_s=3"]
    assert all(fingerprint(tune_config(o), tiny_dense) == base for o in same)
    different = ["tune.mcd_weight=0.3", "tune.max_acc_drop=0.1", "tune.mode=multi", "tune.seed=1",
                 "prune.ballot.obs_epochs=3", "base.density=0.2", "tune.pruner=none", "prune.granularity=unit",
                 "prune.final_train=plain"]
    assert all(fingerprint(tune_config(o), tiny_dense) != base for o in different)
    other = DenseArtifacts(tiny_dense.init_state, tiny_dense.rewind_state,
                           {k: v + 1e-3 if v.is_floating_point() else v for k, v in tiny_dense.trained_state.items()})
    assert fingerprint(tune_config(), other) != base


def test_joining_a_study_made_for_another_configuration_fails(tmp_path):
    cfg = tune_config()
    storage = make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=1)
    study, created = open_study(cfg, storage, "s", "aaaa", 0)
    assert created and study.user_attrs["fingerprint"] == "aaaa"
    again, created = open_study(cfg, storage, "s", "aaaa", 1)
    assert not created and again.study_name == "s"
    with pytest.raises(TuneError, match="created for another configuration or dense model"):
        open_study(cfg, storage, "s", "bbbb", 0)


def test_a_study_whose_set_up_fails_is_removed_so_the_next_run_creates_it(tmp_path):
    cfg = tune_config()
    storage = make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=1)

    def fail(study: optuna.Study) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the creator computes the dense accuracy or queues trial 0

    with pytest.raises(KeyboardInterrupt):
        open_study(cfg, storage, "s", "aaaa", 0, on_create=fail)
    assert "s" not in optuna.get_all_study_names(storage)
    study, created = open_study(cfg, storage, "s", "aaaa", 0)
    assert created and study.user_attrs["ready"] is True


def test_a_set_up_that_fails_after_opening_the_mlflow_parent_run_ends_that_run_as_killed(tmp_path, monkeypatch):
    from ballot.tracking import connect
    from ballot.tuning.mlflow_runs import PARENT_ATTR, end_abandoned_parent, start_parent

    client = connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=1)

    def refused(*args, **kwargs):
        raise RuntimeError("the store refused the parameters")  # after the run exists, before start_parent returns

    monkeypatch.setattr(client, "log_batch", refused)
    with pytest.raises(RuntimeError, match="refused the parameters"):
        open_study(tune_config(), storage, "s", "aaaa", 0,
                   on_create=lambda study: start_parent(client, "ballot-tune", study, "sqlite:///study.db", {"a": 1}),
                   on_abandon=lambda attrs: end_abandoned_parent(client, attrs.get(PARENT_ATTR)))
    assert "s" not in optuna.get_all_study_names(storage)
    (run,) = client.search_runs([client.get_experiment_by_name("ballot-tune").experiment_id])
    assert run.info.status == "KILLED"
    end_abandoned_parent(client, None)  # a set-up stopped before it had a parent run: nothing to end
    client.set_terminated(run.info.run_id, status="FINISHED")
    end_abandoned_parent(client, run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED", "a run that ended is left as it ended"


def test_a_failing_on_abandon_is_reported_and_the_study_still_deleted(tmp_path, capsys):
    storage = make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=1)

    def unreachable(attrs: dict) -> None:
        raise ConnectionError("tracking server down")

    def interrupted(study: optuna.Study) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        open_study(tune_config(), storage, "s", "aaaa", 0, on_create=interrupted, on_abandon=unreachable)
    assert "s" not in optuna.get_all_study_names(storage)
    assert "warning: could not end what the abandoned set-up had started (ConnectionError: tracking server down)" \
        in capsys.readouterr().err


def test_a_stale_set_up_is_deleted_then_handed_to_on_abandon(tmp_path, monkeypatch):
    """What the killed creator had started (its parent run id) reaches on_abandon once the study is deleted (so of
    two processes reclaiming it, only the one whose deletion succeeded); then the study is made afresh."""
    from ballot.tuning.mlflow_runs import PARENT_ATTR

    storage = make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=1)
    orphan = optuna.create_study(storage=storage, study_name="s")
    orphan.set_user_attr(PARENT_ATTR, "run-of-the-killed-creator")  # and never made ready
    _fast_set_up_clock(monkeypatch, stale_s=0.5)
    handed: list[tuple[str, bool]] = []

    def on_abandon(attrs: dict) -> None:
        handed.append((attrs[PARENT_ATTR], "s" in optuna.get_all_study_names(storage)))

    study, created = open_study(tune_config(), storage, "s", "aaaa", 0, on_abandon=on_abandon)
    assert created and study.user_attrs["ready"] is True and PARENT_ATTR not in study.user_attrs
    assert handed == [("run-of-the-killed-creator", False)]


HANGING_CREATOR = """
import sys, time
from pathlib import Path
from ballot.config import ExperimentConfig
from ballot.tuning import study as studies
studies.SETUP_BEAT_S = 0.1

def hang(study):
    Path(sys.argv[2]).write_text("setting up")
    time.sleep(600)

studies.open_study(ExperimentConfig(), studies.make_storage(sys.argv[1], heartbeat_s=1), "s", "aaaa", 0, on_create=hang)
"""


def _fast_set_up_clock(monkeypatch: pytest.MonkeyPatch, stale_s: float) -> None:
    monkeypatch.setattr(studies, "SETUP_BEAT_S", stale_s / 10)
    monkeypatch.setattr(studies, "SETUP_POLL_S", stale_s / 20)
    monkeypatch.setattr(studies, "SETUP_STALE_S", stale_s)


def test_a_study_whose_creator_was_killed_during_set_up_is_created_afresh(tmp_path, monkeypatch, capsys):
    url, marker = sqlite_url(tmp_path / "study.db"), tmp_path / "started"
    creator = subprocess.Popen([sys.executable, "-c", HANGING_CREATOR, url, str(marker)],
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert creator.poll() is None and time.monotonic() < deadline, "the creator never reached its set-up"
            time.sleep(0.05)
        time.sleep(0.5)  # a few set-up beats
        os.kill(creator.pid, signal.SIGKILL)
    finally:
        creator.kill()
        creator.wait()
    storage = make_storage(url, heartbeat_s=1)
    orphan = optuna.load_study(study_name="s", storage=storage)
    assert orphan.user_attrs["set_up_heartbeat"] >= 1 and "ready" not in orphan.user_attrs

    _fast_set_up_clock(monkeypatch, stale_s=1.0)
    study, created = open_study(tune_config(), storage, "s", "aaaa", 0)
    assert created and study.user_attrs["ready"] is True and study.user_attrs["fingerprint"] == "aaaa"
    assert optuna.get_all_study_names(storage) == ["s"]
    assert "deleting it to create it afresh" in capsys.readouterr().err


def _create_in_thread(cfg: ExperimentConfig, storage, on_create) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def create() -> None:
        try:
            outcome["result"] = open_study(cfg, storage, "s", "aaaa", 0, on_create=on_create)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=create)
    thread.start()
    return thread, outcome


def test_a_joiner_waits_for_a_creator_whose_set_up_is_slow_but_alive(tmp_path, monkeypatch):
    _fast_set_up_clock(monkeypatch, stale_s=0.5)
    cfg, storage, started = tune_config(), make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=1), threading.Event()

    def slow(study: optuna.Study) -> None:
        started.set()
        time.sleep(2.0)  # four stale windows, beating all the while

    creator, outcome = _create_in_thread(cfg, storage, slow)
    assert started.wait(60)
    study, created = open_study(cfg, storage, "s", "aaaa", 1)
    creator.join()
    assert not created and study.user_attrs["ready"] is True
    assert outcome["result"][1] is True and outcome["result"][0]._study_id == study._study_id


def test_a_joiner_creates_the_study_when_its_creators_set_up_fails_meanwhile(tmp_path, monkeypatch):
    _fast_set_up_clock(monkeypatch, stale_s=30.0)  # the creator's own deletion, not staleness, must free the name
    cfg, storage = tune_config(), make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=1)
    started, release = threading.Event(), threading.Event()

    def fail(study: optuna.Study) -> None:
        started.set()
        release.wait(60)
        raise RuntimeError("the dense model cannot be read")

    creator, outcome = _create_in_thread(cfg, storage, fail)
    assert started.wait(60)
    threading.Timer(0.5, release.set).start()  # fails while the joiner waits
    study, created = open_study(cfg, storage, "s", "aaaa", 1)
    creator.join()
    assert isinstance(outcome["error"], RuntimeError)
    assert created and study.user_attrs["ready"] is True and optuna.get_all_study_names(storage) == ["s"]


def test_a_trial_beyond_the_budget_steps_back(tmp_path):
    storage = make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=1)
    study = optuna.create_study(storage=storage, study_name="budget")
    first, second = study.ask(), study.ask()  # two workers asked at the same moment for the last slot
    claim_slot(first, n_trials=1)
    with pytest.raises(SurplusTrial):
        claim_slot(second, n_trials=1)
    assert study.trials[1].user_attrs["surplus"] is True


def test_the_baseline_is_queued_again_only_when_it_failed_and_a_racing_duplicate_steps_back():
    cfg = trial_base(tune_config())
    knobs, study = check_space(cfg), optuna.create_study(direction="maximize")
    enqueue_baseline(study, cfg, knobs)
    enqueue_baseline(study, cfg, knobs)
    assert [(t.state, t.user_attrs) for t in study.trials] == [(TrialState.WAITING, {"baseline": True})]
    killed = study.ask()  # trial 0, Ballot's configured values
    enqueue_baseline(study, cfg, knobs)
    assert len(study.trials) == 1, "a running baseline is not queued again"
    study.tell(killed, state=TrialState.FAIL)  # as the heartbeat marks a killed worker's trial
    enqueue_baseline(study, cfg, knobs)  # two workers at the same instant
    study.enqueue_trial(current_values(cfg, knobs), user_attrs={"baseline": True})
    first, second = study.ask(), study.ask()
    claim_slot(first, n_trials=4)
    with pytest.raises(SurplusTrial, match="already runs Ballot's configured values"):
        claim_slot(second, n_trials=4)
    assert (first.number, second.number) == (1, 2) and second.user_attrs["surplus"] is True
    outside = trial_base(tune_config("prune.ballot.conflict_threshold=3.0"))
    empty = optuna.create_study(direction="maximize")
    enqueue_baseline(empty, outside, check_space(outside))
    assert empty.trials == [], "no baseline when a configured value lies outside the space"
    assert outside_space(outside, check_space(outside)) == ["prune.ballot.conflict_threshold (3.0)"]
    assert outside_space(cfg, knobs) == []


def test_a_baseline_that_fails_with_an_error_of_its_own_is_not_queued_again(tiny_data, tiny_dense, monkeypatch):
    """Only a killed baseline is lost; one that raised would raise again on every resume and block the study."""
    from ballot.errors import MaskError
    from ballot.tuning import objective

    def broken(*args, **kwargs):
        raise MaskError("weights not finite")

    cfg = trial_base(tiny_config())
    knobs, study = check_space(cfg), optuna.create_study(direction="maximize")
    enqueue_baseline(study, cfg, knobs)
    monkeypatch.setattr(objective, "run_prune", broken)
    with pytest.raises(MaskError):
        study.optimize(partial(run_trial, ctx=TrialContext(cfg, tiny_data, tiny_dense, knobs, 0.9)), n_trials=1)
    (failed,) = study.trials
    assert failed.state == TrialState.FAIL and failed.user_attrs[RAISED] == "MaskError: weights not finite"
    enqueue_baseline(study, cfg, knobs)
    assert len(study.trials) == 1


def _storage_study(tmp_path: Path) -> optuna.Study:
    storage = make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=1)
    return optuna.create_study(storage=storage, study_name="s", direction="maximize")


@pytest.mark.parametrize("when", ["during its training", "after its last write"])
def test_a_worker_whose_trial_a_peer_failed_as_stale_drops_it_and_still_fills_the_budget(
        when, tmp_path, tiny_data, tiny_dense, monkeypatch, capsys):
    """A worker paused past the grace period wakes to find its trial FAIL (a peer's fail_stale_trials): it must not
    die on Optuna's refusal to update a finished trial, whether its objective still writes to the trial (then
    Optuna's tell raises ValueError) or had returned (then Optuna's own assertion fails)."""
    from ballot.tuning import objective

    study, reclaimed = _storage_study(tmp_path), []
    real_prune, real_trial = objective.run_prune, studies.run_trial

    def reclaim() -> None:  # what a peer's fail_stale_trials does to a trial whose heartbeat stood still
        if not reclaimed:
            (running,) = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            study._storage.set_trial_state_values(running._trial_id, TrialState.FAIL)
            reclaimed.append(running.number)

    def paused_while_training(cfg, data, dense, **kwargs):
        reclaim()
        return real_prune(cfg, data, dense, **kwargs)

    def paused_before_the_tell(trial, ctx):
        value = real_trial(trial, ctx)
        reclaim()
        return value

    if when == "during its training":
        monkeypatch.setattr(objective, "run_prune", paused_while_training)
    else:
        monkeypatch.setattr(studies, "run_trial", paused_before_the_tell)
    cfg = trial_base(tune_config("tune.n_trials=2", "tune.heartbeat_s=1"))
    studies.run_worker(study, TrialContext(cfg, tiny_data, tiny_dense, check_space(cfg), 0.0), callbacks=[])
    trials = study.trials
    assert [(t.state, t.user_attrs.get("baseline", False)) for t in trials] == \
        [(TrialState.FAIL, True), (TrialState.COMPLETE, True), (TrialState.COMPLETE, False)], "baseline queued again"
    assert RAISED not in trials[0].user_attrs and reclaimed == [0]
    assert "warning: trial 0 was failed as stale by another process" in capsys.readouterr().err


def test_a_trial_that_raises_a_value_error_of_its_own_still_stops_the_worker(tmp_path, tiny_data, tiny_dense,
                                                                           monkeypatch):
    from ballot.tuning import objective

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(objective, "run_prune", broken)
    cfg = trial_base(tune_config("tune.n_trials=2", "tune.timeout_s=60"))  # a worker that went on would stop
    study, reported = _storage_study(tmp_path), []
    with pytest.raises(ValueError, match="a bug"):
        studies.run_worker(study, TrialContext(cfg, tiny_data, tiny_dense, check_space(cfg), 0.0),
                           callbacks=[lambda study, trial: reported.append((trial.number, trial.state))])
    assert study.trials[0].user_attrs[RAISED] == "ValueError: a bug"
    assert reported == [(0, TrialState.FAIL)], "the failed trial reaches the callbacks (its MLflow run) all the same"


def test_a_trial_interrupted_by_ctrl_c_reaches_the_callbacks_as_failed(tmp_path, tiny_data, tiny_dense, monkeypatch):
    from ballot.tuning import objective

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(objective, "run_prune", interrupted)
    cfg = trial_base(tune_config("tune.n_trials=2"))
    study, reported = _storage_study(tmp_path), []
    with pytest.raises(KeyboardInterrupt):
        studies.run_worker(study, TrialContext(cfg, tiny_data, tiny_dense, check_space(cfg), 0.0),
                           callbacks=[lambda study, trial: reported.append((trial.number, trial.state))])
    assert reported == [(0, TrialState.FAIL)] and study.trials[0].state == TrialState.FAIL


def test_a_baseline_trial_that_failed_runs_again_when_the_study_resumes(tmp_path):
    out, uri = tmp_path / "tune", f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = ["tune", *TUNE_FLAGS, "--out", str(out), "--dense", str(tmp_path / "dense"), "--tracking-uri", uri]
    assert main([*command, "--n-trials", "1", "--timeout", "1e-9"]) == 0  # the study is created; no trial starts
    study = optuna.load_study(study_name=json.loads((out / "report" / "summary.json").read_text())["study"],
                              storage=sqlite_url(out / "study.db"))
    study.tell(study.ask(), state=TrialState.FAIL)  # trial 0, the baseline, lost as a killed worker's trial is
    assert main([*command, "--n-trials", "1"]) == 0
    trials = study.trials
    assert [(t.state, t.user_attrs.get("baseline")) for t in trials] == \
        [(TrialState.FAIL, True), (TrialState.COMPLETE, True)]
    assert trials[1].params == {"prune.ballot.conflict_threshold": 0.5, "prune.ballot.refine_train.epochs": 2}
    assert json.loads((out / "report" / "summary.json").read_text())["baseline"]["number"] == 1


def test_a_worker_stopped_by_bad_input_prints_one_line_not_a_traceback(tmp_path, capfd):
    cfg, url = trial_base(tune_config()), sqlite_url(tmp_path / "study.db")
    study, _ = open_study(cfg, make_storage(url, heartbeat_s=1), "s", "aaaa", 0)
    job = WorkerJob(to_dict(cfg), url, "s", "aaaa", str(tmp_path / "no-dense"), None,
                    f"sqlite:///{tmp_path / 'mlflow.db'}", 0)
    with pytest.raises(TuneError, match=r"tune-worker-0 \(exit code 2\); the study can be resumed"):
        run_workers(job, 1, study, n_trials=1)
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert f"ballot: error: tune-worker-0: dense weights '{tmp_path / 'no-dense'}" in err


# --- feasibility and choice ---------------------------------------------------------------------------------------

def _tell(study: optuna.Study, values, margin: float, **attrs) -> None:
    trial = study.ask()
    trial.set_constraint("acc_drop", margin)
    for key, value in {"feasible": margin <= 0, **attrs}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, values)


def test_an_infeasible_trial_is_never_chosen_even_with_the_best_objective():
    study = optuna.create_study(direction="maximize")
    _tell(study, 0.99, margin=0.05, objective=0.99)  # would win, but lost too much accuracy
    _tell(study, 0.70, margin=-0.01, objective=0.70)
    _tell(study, 0.60, margin=-0.02, objective=0.60)
    chosen = choose(study)
    assert chosen.number == 1
    summary = summarise(study, 3, chosen)
    assert summary["best"]["number"] == 1 and summary["trials"]["infeasible"] == 1
    only_infeasible = optuna.create_study(direction="maximize")
    _tell(only_infeasible, 0.9, margin=0.1)
    assert choose(only_infeasible) is None


def test_multi_objective_pick_is_the_lowest_cwv_on_the_feasible_front():
    study = optuna.create_study(directions=["maximize", "minimize"])
    _tell(study, (0.99, 0.001), margin=0.03)   # dominates everything, infeasible
    _tell(study, (0.90, 0.020), margin=-0.01)  # front
    _tell(study, (0.88, 0.010), margin=-0.01)  # front, lowest CWV
    _tell(study, (0.87, 0.030), margin=-0.01)  # dominated
    assert [t.number for t in pareto_front(study)] == [1, 2]
    assert choose(study).number == 2


# --- the objective on real data -------------------------------------------------------------------------------

def test_the_median_pruner_stops_a_hopeless_trial_and_the_saving_is_counted(tiny_data, tiny_dense):
    space = {"prune.ballot.refine_train.lr": {"type": "float", "low": 1e-7, "high": 0.1, "log": True},
             "prune.ballot.refine_train.epochs": {"type": "int", "low": 5, "high": 6}}
    cfg = trial_base(tiny_config(f"tune.space={json.dumps(space)}", "tune.n_trials=2", "tune.pruner=median",
                                 "tune.pruner_startup_trials=1", "tune.pruner_warmup_epochs=0"))
    study = optuna.create_study(direction="maximize", pruner=make_pruner(cfg.tune))
    study.enqueue_trial({"prune.ballot.refine_train.lr": 0.05, "prune.ballot.refine_train.epochs": 6})
    study.enqueue_trial({"prune.ballot.refine_train.lr": 1e-7, "prune.ballot.refine_train.epochs": 6})  # hopeless
    ctx = TrialContext(cfg, tiny_data, tiny_dense, check_space(cfg), dense_val_accuracy(cfg, tiny_data, tiny_dense))
    study.optimize(partial(run_trial, ctx=ctx), n_trials=2)
    good, hopeless = study.trials
    assert good.state == optuna.trial.TrialState.COMPLETE
    assert len(good.intermediate_values) == 6  # refine_start 'best': the pruner sees the theta_k training's epochs
    assert good.user_attrs["epochs_run"] == good.user_attrs["epochs_planned"]  # and both trainings ran
    assert hopeless.state == optuna.trial.TrialState.PRUNED
    assert hopeless.user_attrs["epochs_run"] < hopeless.user_attrs["epochs_planned"]
    assert good.value == pytest.approx(good.user_attrs["val_acc"] - 0.5 * good.user_attrs["val_mcd"])
    assert good.user_attrs["feasible"] == (good.user_attrs["val_acc"] >= ctx.dense_val_acc - 0.02)
    epochs = summarise(study, 2, choose(study))["epochs"]
    assert epochs["saved_by_pruner"] == hopeless.user_attrs["epochs_planned"] - hopeless.user_attrs["epochs_run"] > 0


# --- the command --------------------------------------------------------------------------------------------------

def test_tune_help():
    with pytest.raises(SystemExit) as info:
        main(["tune", "--help"])
    assert info.value.code == 0


def test_bad_tune_settings_exit_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "tune"
    code = main(["tune", *TUNE_FLAGS, "--out", str(out), "--set", "tune.space={prune.ballot.obs_epochs: {type: int}}"])
    assert code == 2 and "tune.space.prune.ballot.obs_epochs.low: expected a finite integer" in capsys.readouterr().err
    assert main(["tune", *TUNE_FLAGS, "--out", str(out), "--set", "tune.space.prune.ballot.obs_epochs={}"]) == 2
    assert "a knob is named by its whole dotted path" in capsys.readouterr().err
    assert main(["tune", *TUNE_FLAGS, "--out", str(out), "--storage", "nonsense"]) == 2
    assert "tune.storage: 'nonsense' is not a database URL" in capsys.readouterr().err
    assert not out.exists(), "nothing is written for bad input"


def _mlflow_runs(uri: str, study: str) -> tuple[object, list]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("ballot-tune")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`optuna.study` = '{study}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, "one parent run per study"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def test_two_trial_study_end_to_end_then_resumed_to_three(tmp_path):
    out, uri = tmp_path / "tune", f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = ["tune", *TUNE_FLAGS, "--out", str(out), "--dense", str(tmp_path / "dense"), "--tracking-uri", uri]
    assert main([*command, "--n-trials", "2"]) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["trials"]["finished"] == 2 == summary["n_trials_requested"] and summary["trials"]["failed"] == 0
    trials = json.loads((out / "report" / "trials.json").read_text())
    assert trials[0]["user_attrs"]["baseline"] is True, "trial 0 runs the configured values"
    assert trials[0]["params"] == {"prune.ballot.conflict_threshold": 0.5, "prune.ballot.refine_train.epochs": 2}
    for plot in ("history", "importances", "intermediate"):
        path = out / "report" / "plots" / f"{plot}.png"
        assert plot in summary["plots_skipped"] or (path.is_file() and path.stat().st_size > 0), plot

    best = load_best(out / "best_params.yaml")
    chosen = max((t for t in trials if t["user_attrs"].get("feasible")), key=lambda t: t["values"][0])
    assert summary["best"]["number"] == chosen["number"]
    assert best == {**chosen["params"], OBJECTIVE_WEIGHT_KEY: tune_config().tune.mcd_weight}, "the trials' weight too"
    cfg, applied = apply_best(tune_config(), out / "best_params.yaml")
    assert applied == best and cfg.prune.ballot.conflict_threshold == best["prune.ballot.conflict_threshold"]
    assert cfg.prune.ballot.refine_train.epochs == best["prune.ballot.refine_train.epochs"]

    parent, children = _mlflow_runs(uri, summary["study"])
    assert parent.info.status == "FINISHED" and len(children) == 2
    for run in children:
        assert set(run.data.params) == set(SPACE) and run.data.tags["optuna.state"] == "COMPLETE"
        m = run.data.metrics
        assert m["objective"] == pytest.approx(m["val_acc"] - 0.5 * m["val_mcd"]) and "val_cwv" in m

    interrupted = optuna.load_study(study_name=summary["study"], storage=sqlite_url(out / "study.db"))
    interrupted.tell(interrupted.ask(), state=TrialState.FAIL)  # as a Ctrl-C leaves it
    assert main([*command, "--n-trials", "3"]) == 0  # the same study, continued to three trials
    summary = json.loads((out / "report" / "summary.json").read_text())
    resumed = [t for t in json.loads((out / "report" / "trials.json").read_text()) if t["state"] == "COMPLETE"]
    assert summary["trials"]["finished"] == 3 and len(resumed) == 3
    parent_again, children = _mlflow_runs(uri, summary["study"])
    assert parent_again.info.run_id == parent.info.run_id and len(children) == 3

    in_one_go = tmp_path / "in-one-go"
    assert main(["tune", *TUNE_FLAGS, "--out", str(in_one_go), "--dense", str(tmp_path / "dense"), "--tracking-uri",
                 uri, "--study-name", "in-one-go", "--n-trials", "3"]) == 0
    fresh = json.loads((in_one_go / "report" / "trials.json").read_text())
    assert [t["params"] for t in fresh] == [t["params"] for t in resumed], "a resumed study suggests the same trials"
    assert len({json.dumps(t["params"], sort_keys=True) for t in fresh}) == 3


def test_the_chosen_trials_kept_model_is_what_prune_would_train(tiny_data, tiny_dense, tmp_path):
    cfg = tune_config("tune.n_trials=2", "tune.pruner=none")
    kept_dir = tmp_path / "kept"
    outcome = run_study(cfg, tiny_data, tiny_dense, dense_dir=tmp_path / "dense", best_path=tmp_path / "best.yaml",
                        report_dir=tmp_path / "report", default_storage=tmp_path / "study.db",
                        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", keep_dir=kept_dir)
    assert [p.name for p in kept_dir.iterdir()] == [f"trial-{outcome.chosen.number}"], "only the chosen one stays"

    tuned, _ = apply_best(cfg, tmp_path / "best.yaml")
    kept = find_kept(kept_dir, prune_recipe(tuned, tiny_dense))
    assert kept is not None and kept.trial == outcome.chosen.number and kept.seconds > 0
    model, mask = load_pruned(kept.folder, tuned, tiny_data)
    again = run_prune(tuned, tiny_data, tiny_dense, progress=False)
    assert set(mask) == set(again.mask) and all(torch.equal(mask[name], again.mask[name]) for name in mask)
    ours, theirs = model.state_dict(), again.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), "bitwise the same"

    for key, value in {"base.seed": 1, "prune.ballot.layer_floor": 0.3, "prune.final_train": "plain"}.items():
        assert find_kept(kept_dir, prune_recipe(with_values(tuned, {key: value}), tiny_dense)) is None, key


def test_multi_objective_study_writes_the_pareto_front_and_picks_by_the_rule(tmp_path):
    out, uri = tmp_path / "tune", f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["tune", *TUNE_FLAGS, "--out", str(out), "--tracking-uri", uri, "--n-trials", "3",
                 "--set", "tune.mode=multi", "--set", "tune.max_acc_drop=1.0"])
    assert code == 0
    front = json.loads((out / "report" / "pareto_front.json").read_text())
    trials = json.loads((out / "report" / "trials.json").read_text())
    assert front and all(row["number"] in {t["number"] for t in trials} for row in front)
    for row in front:  # no trial dominates a front member
        assert not any(t["values"][0] >= row["val_acc"] and t["values"][1] <= row["val_cwv"]
                       and tuple(t["values"]) != (row["val_acc"], row["val_cwv"]) for t in trials)
    chosen = [row for row in front if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["val_cwv"] == min(row["val_cwv"] for row in front)
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert best["trial"] == chosen[0]["number"] and best["mode"] == "multi"
    assert best["params"] == {**chosen[0]["params"], OBJECTIVE_WEIGHT_KEY: tune_config().tune.mcd_weight}
    assert (out / "report" / "plots" / "pareto_front.png").stat().st_size > 0
    assert all(len(t["values"]) == 2 and not t["user_attrs"].get("surplus") for t in trials)


@pytest.mark.parametrize("race", ["stamp", "create"])
def test_a_race_creating_the_storage_tables_is_retried(race, tmp_path, monkeypatch):
    from sqlalchemy.exc import IntegrityError, OperationalError

    calls, real = [], optuna.storages.RDBStorage
    lost = {"stamp": IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed")),
            "create": OperationalError("CREATE TABLE alembic_version", {},
                                       Exception("table alembic_version already exists"))}[race]

    def loses_the_race_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise lost
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", loses_the_race_once)
    make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=10)
    assert len(calls) == 2


def test_a_storage_error_that_is_not_a_race_fails_at_once(tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    calls = []

    def unreadable(*args, **kwargs):
        calls.append(1)
        raise OperationalError("SELECT", {}, Exception("file is not a database"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", unreadable)
    with pytest.raises(StorageError, match="file is not a database"):
        make_storage(sqlite_url(tmp_path / "study.db"), heartbeat_s=10)
    assert len(calls) == 1


def test_a_study_with_no_feasible_trial_says_why_and_what_to_change(tmp_path, capsys):
    out, uri = tmp_path / "tune", f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["tune", *TUNE_FLAGS, "--density", "0.01", "--set", "tune.max_acc_drop=0", "--n-trials", "1",
                 "--out", str(out), "--tracking-uri", uri])
    assert code == 0
    trial = json.loads((out / "report" / "trials.json").read_text())[0]
    assert trial["user_attrs"]["feasible"] is False, "1% of an mlp on tiny training stays below the dense model"
    err = capsys.readouterr().err
    dense_acc = json.loads((out / "report" / "summary.json").read_text())["dense_val_acc"]
    assert f"tune: no feasible trial: none reached val acc {dense_acc:.4f}" in err
    assert "raise tune.max_acc_drop" in err
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert best["params"] == {} and "tune.max_acc_drop 0.0" in best["note"]


def test_a_class_with_few_validation_images_is_warned_about_by_name_and_count():
    names = ["cat", "dog", "eel", "fox"]
    labels = torch.tensor([0] * 12 + [1] * 30 + [3] * 4)  # no eel at all: an absent class is not the thinnest
    warning = thin_validation_warning(labels, names)
    assert warning.startswith("warning: the validation split holds 4 image(s) of class 'fox'")
    assert "0.25" in warning and "data.val_fraction" in warning
    assert thin_validation_warning(torch.tensor([0] * 10 + [1] * 10 + [3] * 10), names) is None


def test_a_study_on_long_tailed_digits_warns_that_its_validation_split_is_thin(tmp_path, capsys):
    out, uri = tmp_path / "tune", f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*TUNE_FLAGS, "--n-trials", "1", "--tracking-uri", uri]
    assert main(["tune", *common, "--set", "data.imbalance_ratio=10", "--out", str(out)]) == 0
    assert "warning: the validation split holds" in capsys.readouterr().err
    assert main(["tune", *common, "--out", str(tmp_path / "balanced")]) == 0
    assert "warning: the validation split" not in capsys.readouterr().err, "balanced digits: 13 or more a class"


def test_no_choice_reason_tells_a_study_that_completed_nothing_from_one_below_the_accuracy_floor():
    counts = {"complete": 0, "pruned": 3, "failed": 1}
    assert no_choice_reason({"trials": counts, "dense_val_acc": 0.9}, 0.02) == \
        "no feasible trial: none completed (3 pruned, 1 failed)"
    below = no_choice_reason({"trials": {**counts, "complete": 2}, "dense_val_acc": 0.9}, 0.02)
    assert below.startswith("no feasible trial: none reached val acc 0.8800 (the dense model's 0.9000 - "
                            "tune.max_acc_drop 0.02)") and below.endswith("raise tune.max_acc_drop")


def test_a_joining_processs_sampler_seed_stays_in_optunas_range():
    tune = tune_config("tune.seed=4294967000").tune  # plus a joining process's offset of 1000 + pid
    assert isinstance(make_sampler(tune, 1000 + 4_194_304), optuna.samplers.TPESampler)  # Optuna refused 2**32 + ...


def test_storage_that_cannot_take_the_study_is_refused_in_one_line(tmp_path, monkeypatch):
    import sqlite3

    foreign = tmp_path / "mlflow.db"  # another program's database with an alembic_version table, as MLflow's has
    with contextlib.closing(sqlite3.connect(foreign)) as connection:
        connection.execute("create table alembic_version (version_num varchar(32))")
        connection.execute("insert into alembic_version values ('1bd49d398cd2')")
        connection.commit()
    with pytest.raises(StorageError, match=r"it is another program's database \(its tables are not Optuna's; the "
                                           r"MLflow store\?\)"):
        make_storage(f"sqlite:///{foreign}", 10)
    with contextlib.closing(sqlite3.connect(foreign)) as connection:  # refused before Optuna wrote to it
        assert {row[0] for row in connection.execute("select name from sqlite_master")} == {"alembic_version"}
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    with pytest.raises(StorageError, match=f"'{locked}' is read-only"):
        make_storage(f"sqlite:///{locked / 'study.db'}", 10)


def test_a_misspelt_knob_is_refused_before_the_dense_model_is_trained(tmp_path, capsys):
    space = json.dumps({"prune.ballot.bogus_knob": {"type": "float", "low": 0.1, "high": 2.0}})
    dense = tmp_path / "dense"
    code = main(["tune", *TUNE_FLAGS, "--out", str(tmp_path / "tune"), "--dense", str(dense), "--set",
                 f"tune.space={space}"])
    assert code == 2 and not dense.exists(), "nothing trained"
    err = capsys.readouterr().err
    assert "ballot: error: tune.space.prune.ballot.bogus_knob: value 0.1 is not valid with the other settings" in err and "dense:" not in err


def test_an_optuna_database_of_another_optuna_version_keeps_optunas_own_message(tmp_path):
    import sqlite3

    url = f"sqlite:///{tmp_path / 'old.db'}"
    make_storage(url, 10)
    with contextlib.closing(sqlite3.connect(tmp_path / "old.db")) as connection:
        connection.execute("update alembic_version set version_num = 'v1.2.0.a'")
        connection.commit()
    with pytest.raises(StorageError) as refused:
        make_storage(url, 10)
    assert "not Optuna's" not in str(refused.value) and "optuna" in str(refused.value).lower()
