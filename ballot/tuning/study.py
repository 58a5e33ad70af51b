"""Studies: storage URLs, sampler and pruner, creating or joining a study, and workers with an exact trial budget.

Budget: a study is done when it holds ``tune.n_trials`` finished (COMPLETE or PRUNED) trials, whoever ran them.
Before each trial a worker fails stale trials (Optuna's heartbeat: a RUNNING trial whose process stopped beating for
twice ``tune.heartbeat_s`` becomes FAIL), then starts one only if finished + running trials are below the budget,
else it waits for the running ones; a trial that still finds the budget taken (two workers asked at once) steps
back as a FAIL marked ``surplus`` without running. A killed worker therefore costs one FAIL trial, which the
survivors (or the next run on the same storage) replace, and the finished count ends exact. A lost baseline trial
(Ballot's configured values) is queued again before the next trial (``enqueue_baseline``). A worker that was only
paused past the grace period finds its trial failed by a peer: it warns, drops that result and goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import TrialState

from ballot.config import (ExperimentConfig, TuneConfig, check_storage_url, data_identity, experiment_from_params,
                           to_dict)
from ballot.data import DataBundle
from ballot.errors import StorageError, TuneError, UserError
from ballot.knobs import Knob
from ballot.processes import stop_children, terminate_with_parent
from ballot.pruning import DenseArtifacts
from ballot.tuning.kept import update_with_states
from ballot.tuning.objective import (BASELINE, COUNTED, RAISED, SURPLUS, SurplusTrial, TrialContext, baseline_trials,
                                     run_trial)
from ballot.tuning.space import current_values

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DIRECTIONS = {"single": ["maximize"], "multi": ["maximize", "minimize"]}
FINGERPRINT_ATTR, READY_ATTR, DENSE_ACC_ATTR = "fingerprint", "ready", "dense_val_acc"
SETUP_BEAT_ATTR = "set_up_heartbeat"
SEARCH_KEYS = ("space", "mode", "sampler", "seed", "pruner", "pruner_startup_trials", "pruner_warmup_epochs",
               "mcd_weight", "max_acc_drop")  # the tune settings that change what a trial means
# the prune settings a trial reads (its method is always Ballot); dvc.yaml's tune stage lists them and SEARCH_KEYS
TRIAL_PRUNE_KEYS = ("ballot", "retrain", "min_per_layer", "granularity", "final_train", "recalibrate_bn")
# a creator beats every SETUP_BEAT_S while it sets a study up; joiners poll every SETUP_POLL_S and take a
# study whose beat stood still for SETUP_STALE_S for lost (a sqlite write may wait up to 60 s for a lock)
SETUP_BEAT_S, SETUP_POLL_S, SETUP_STALE_S = 5.0, 0.5, 90.0
SETUP_ATTEMPTS = 3


def sqlite_url(path: str | Path) -> str:
    """sqlite URL of a database file (relative paths stay relative to the working directory)."""
    return f"sqlite:///{Path(path).as_posix()}"


def redact(url: str) -> str:
    """``url`` with any password masked, for logs and MLflow tags."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def make_storage(url: str, heartbeat_s: int,
                 on_stale: Callable[[optuna.Study, Any], None] | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage (sqlite, PostgreSQL, any SQLAlchemy URL) with heartbeats, so killed trials become FAIL."""
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError

    parsed = check_storage_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:  # check_storage_url refuses in-memory databases
            _check_sqlite_writable(Path(parsed.database), url)
        engine: dict[str, Any] = {"connect_args": {"timeout": 60}}  # wait for another process's write lock
    else:
        engine = {"pool_pre_ping": True}
    attempt = 0
    while True:
        try:
            _check_not_another_programs(url)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                                                  grace_period=2 * heartbeat_s, heartbeat_stale_trial_callback=on_stale)
        except SQLAlchemyError as error:
            # Workers opening a new storage at once race to create its tables; the loser finds them made (the schema
            # stamp's IntegrityError, or sqlite's "table ... already exists").
            if not (isinstance(error, IntegrityError) or "already exists" in str(error)):
                first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise StorageError(f"cannot open the Optuna storage {redact(url)}: {first_line}") from None
            attempt += 1
            if attempt == 3:
                raise StorageError(f"cannot open the Optuna storage {redact(url)}: its tables could not be "
                                   "created (another process keeps creating them)") from None
            time.sleep(0.5 * attempt)
        except ImportError as error:
            raise StorageError(f"cannot open the Optuna storage {redact(url)}: {error}") from None
        except RuntimeError as error:  # Optuna's schema check on tables an older (or newer) Optuna made
            if "table schema" not in str(error):
                raise
            raise StorageError(f"cannot open the Optuna storage {redact(url)}: {str(error).splitlines()[0]}") from None


def _check_not_another_programs(url: str) -> None:
    """StorageError when the database at ``url`` is another program's that keeps its schema version with alembic,
    as MLflow's store does: Optuna would add its tables to it, then read that program's ``alembic_version`` as its
    own and fail its schema check. Other programs' tables beside Optuna's are fine."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if "alembic_version" in tables and "studies" not in tables:
        raise StorageError(f"cannot open the Optuna storage {redact(url)}: it is another program's database (its "
                           "tables are not Optuna's; the MLflow store?); give the study a database of its own")


def _check_sqlite_writable(database: Path, url: str) -> None:
    """StorageError unless the sqlite file ``database`` (or, when it does not exist yet, its folder, created here)
    can be written: sqlite opens a read-only file and fails only at the first write, deep inside Optuna."""
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(f"cannot open the Optuna storage {redact(url)}: cannot create its folder "
                           f"'{database.parent}' ({error.strerror})") from None
    target = database if database.exists() else database.parent
    if not os.access(target, os.W_OK) or not os.access(database.parent, os.W_OK):  # sqlite writes a journal beside it
        raise StorageError(f"cannot open the Optuna storage {redact(url)}: '{target}' is read-only")


def make_sampler(tune: TuneConfig, worker: int, trials: int = 0) -> optuna.samplers.BaseSampler:
    """TPE (constant liar for parallel workers, constraint-aware) or random, seeded from tune.seed, the worker's
    offset and the number of finished ``trials`` of the study: a worker makes one before each trial, so a study
    resumed by one process suggests what the same study run in one go would have."""
    key = f"{tune.seed}:{worker}:{trials}".encode()
    seed = int.from_bytes(hashlib.sha256(key).digest()[:4], "little")  # within Optuna's range, [0, 2**32)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    """Median or successive-halving pruner over refined-training epochs; none in multi mode."""
    if tune.mode == "multi" or tune.pruner == "none":
        return optuna.pruners.NopPruner()
    if tune.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, tune.pruner_warmup_epochs))
    return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup_trials,
                                       n_warmup_steps=tune.pruner_warmup_epochs)


def fingerprint(cfg: ExperimentConfig, dense: DenseArtifacts) -> str:
    """SHA-256 over everything that decides a trial's result: data, dense phase, Ballot's fixed knobs, the search
    settings, and the dense model's bytes. Budget, storage and device settings are left out."""
    d = to_dict(cfg)
    payload = {
        "base": {k: v for k, v in d["base"].items() if k != "device"},
        "data": data_identity(d["data"]),
        "train_dense": d["train_dense"],
        "prune": {k: d["prune"][k] for k in TRIAL_PRUNE_KEYS},
        "tune": {k: d["tune"][k] for k in SEARCH_KEYS},
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    update_with_states(digest, (dense.rewind_state, dense.trained_state))
    return digest.hexdigest()


def open_study(cfg: ExperimentConfig, storage: optuna.storages.RDBStorage, name: str, fp: str, worker: int,
               on_create: Callable[[optuna.Study], None] | None = None,
               on_abandon: Callable[[dict[str, Any]], None] | None = None) -> tuple[optuna.Study, bool]:
    """Create study ``name`` (then ``on_create`` and mark it ready) or join it after checking its fingerprint;
    (study, whether this call created it).

    Set-up is all or nothing. When it fails (an error, Ctrl-C) the creator deletes the study again. While it runs,
    a thread bumps a set-up heartbeat; a study that is not ready and whose heartbeat stood still for
    ``SETUP_STALE_S`` lost its creator (SIGKILL, a lost machine), and the next process deletes it and creates it
    afresh. A study deleted under a waiting process is created by that process instead. ``on_abandon`` gets the
    user attributes of a study so deleted (to end what its set-up had started elsewhere: the MLflow parent run):
    before the creator's own deletion, after a reclaiming process's; its errors are printed, not raised."""
    tune = cfg.tune
    kwargs = {"storage": storage, "study_name": name, "sampler": make_sampler(tune, worker),
              "pruner": make_pruner(tune)}
    for _ in range(SETUP_ATTEMPTS):
        try:
            study = optuna.create_study(directions=DIRECTIONS[tune.mode], **kwargs)
        except optuna.exceptions.DuplicatedStudyError:
            try:
                study = optuna.load_study(**kwargs)
            except KeyError:  # deleted between the two calls: its creator's set-up failed
                continue
            if _await_set_up(study, storage, on_abandon):
                _check_joinable(study, tune, fp)
                return study, False
            continue
        _set_up(study, storage, fp, on_create, on_abandon)
        return study, True
    raise TuneError(f"study '{name}' could not be created or joined: it was deleted {SETUP_ATTEMPTS} times while "
                    "this run tried (other processes' set-up keeps failing); see their errors")


def _hand_over(on_abandon: Callable[[dict[str, Any]], None] | None, attrs: dict[str, Any]) -> None:
    """Give an abandoned study's user attributes to ``on_abandon``; its failure is printed, never raised: deleting the
    study matters more."""
    if on_abandon is None:
        return
    try:
        on_abandon(attrs)
    except Exception as error:  # noqa: BLE001  whatever the callback's store says, the study still goes
        print(f"warning: could not end what the abandoned set-up had started ({type(error).__name__}: {error})",
              file=sys.stderr)


def _set_up(study: optuna.Study, storage: optuna.storages.RDBStorage, fp: str,
            on_create: Callable[[optuna.Study], None] | None,
            on_abandon: Callable[[dict[str, Any]], None] | None) -> None:
    """Stamp the fingerprint, run ``on_create`` and mark the study ready, beating all the while; delete the study
    if anything fails."""
    study_id = study._study_id  # by id, not by name (though sqlite gives a study made afresh the same id again)
    stop = threading.Event()

    def beat() -> None:
        count = 0
        while not stop.wait(SETUP_BEAT_S):
            count += 1
            with contextlib.suppress(Exception):  # a missed beat only shortens the joiners' patience
                storage.set_study_user_attr(study_id, SETUP_BEAT_ATTR, count)

    beater = threading.Thread(target=beat, name="study-set-up-heartbeat", daemon=True)
    beater.start()
    try:
        study.set_user_attr(FINGERPRINT_ATTR, fp)
        if on_create is not None:
            on_create(study)
        study.set_user_attr(READY_ATTR, True)
    except BaseException:
        # the set-up's own error is the one to report; the heartbeat still beats, so no other process reclaims the
        # study meanwhile, and a kill before the deletion leaves it for them (with what it had started)
        with contextlib.suppress(Exception):
            _hand_over(on_abandon, storage.get_study_user_attrs(study_id))
        with contextlib.suppress(Exception):
            storage.delete_study(study_id)
        raise
    finally:
        stop.set()
        beater.join()


def _await_set_up(study: optuna.Study, storage: optuna.storages.RDBStorage,
                  on_abandon: Callable[[dict[str, Any]], None] | None) -> bool:
    """Wait until the study's creator marks it ready (True). False when the study is gone: deleted by its creator
    (its set-up failed), or deleted here because its set-up heartbeat stood still for ``SETUP_STALE_S``."""
    last_beat: object = None
    since = time.monotonic()
    while True:
        try:
            attrs = study.user_attrs
        except KeyError:  # the storage no longer holds it
            return False
        if attrs.get(READY_ATTR):
            return True
        beat = attrs.get(SETUP_BEAT_ATTR)
        if beat != last_beat:
            last_beat, since = beat, time.monotonic()
        elif time.monotonic() - since > SETUP_STALE_S:
            print(f"study '{study.study_name}' was never made ready and its creator stopped for "
                  f"{SETUP_STALE_S:.0f} s (killed?): deleting it to create it afresh", file=sys.stderr)
            try:  # deleted first, so that of two processes reclaiming it only the one that deletes it hands it over
                storage.delete_study(study._study_id)
            except KeyError:  # another process reclaimed it first; its new study is kept
                return False
            _hand_over(on_abandon, attrs)
            return False
        time.sleep(SETUP_POLL_S)


def _check_joinable(study: optuna.Study, tune: TuneConfig, fp: str) -> None:
    theirs = study.user_attrs.get(FINGERPRINT_ATTR)
    if theirs != fp:
        raise TuneError(f"study '{study.study_name}' was created for another configuration or dense model "
                        f"(fingerprint {str(theirs)[:12]}, this run {fp[:12]}); use the same params and dense "
                        "states (--dense), or another study name")
    wanted = [optuna.study.StudyDirection[d.upper()] for d in DIRECTIONS[tune.mode]]
    if study.directions != wanted:
        raise TuneError(f"study '{study.study_name}' has directions {study.directions}, mode '{tune.mode}' needs "
                        f"{wanted}")


def trial_counts(study: optuna.Study) -> tuple[int, int]:
    """(finished, finished + running) trials of the study."""
    trials = study.get_trials(deepcopy=False, states=COUNTED)
    return sum(t.state in FINISHED for t in trials), len(trials)


def outside_space(cfg: ExperimentConfig, knobs: list[Knob]) -> list[str]:
    """'key (value)' of each configured value the search space does not hold: then the study has no baseline."""
    values = current_values(cfg, knobs)
    return [f"{knob.key} ({values[knob.key]!r})" for knob in knobs if not knob.contains(values[knob.key])]


def enqueue_baseline(study: optuna.Study, cfg: ExperimentConfig, knobs: list[Knob]) -> None:
    """Queue a trial of Ballot's configured values (user attribute ``baseline``) unless a baseline trial ran, runs or
    waits, or a configured value lies outside the space (then the study has none). Two processes may queue one at
    the same moment: the later-numbered steps back when it starts (``claim_slot``)."""
    if not baseline_trials(study) and not outside_space(cfg, knobs):
        study.enqueue_trial(current_values(cfg, knobs), user_attrs={BASELINE: True})


def _fail_stale_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose heartbeat stood still (their process died): Optuna's call, still experimental."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def others_running(study: optuna.Study) -> bool:
    """Whether another process is running a trial of ``study`` now (stale trials failed first)."""
    _fail_stale_trials(study)
    return any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))


def run_worker(study: optuna.Study, ctx: TrialContext, callbacks: list[Callable[..., None]], worker: int = 0) -> int:
    """Run trials until the study holds ``tune.n_trials`` finished ones or ``tune.timeout_s`` passes, queueing the
    baseline again first if it was lost (a killed worker's trial); returns how many trials this worker ran. Each
    trial's sampler is seeded by ``make_sampler`` from the worker's offset ``worker`` and the study's finished
    trials."""
    tune = ctx.cfg.tune
    poll = max(0.2, min(2.0, tune.heartbeat_s / 2))
    started, ran = time.monotonic(), 0
    while True:
        _fail_stale_trials(study)
        finished, taken = trial_counts(study)
        if finished >= tune.n_trials or (tune.timeout_s is not None and time.monotonic() - started >= tune.timeout_s):
            return ran
        if taken >= tune.n_trials:  # the rest of the budget is running elsewhere (or stale, until failed)
            time.sleep(poll)
            continue
        enqueue_baseline(study, ctx.cfg, ctx.knobs)
        study.sampler = make_sampler(tune, worker, finished)  # not failed trials: a resume after Ctrl-C draws alike
        asked: list[optuna.Trial] = []
        try:
            study.optimize(partial(_asked_trial, asked=asked, ctx=ctx), n_trials=1, callbacks=callbacks,
                           catch=(SurplusTrial,))
        # Optuna's tell refuses a finished trial: ValueError when the objective raised (its write to the trial was
        # refused), an AssertionError of Optuna's own when it returned (the trial was failed after its last write)
        except BaseException as error:
            if not (isinstance(error, (ValueError, AssertionError)) and asked and reclaimed(study, asked[0])):
                _report_failure(study, asked, callbacks)
                raise
            print(f"warning: trial {asked[0].number} was failed as stale by another process while this one still ran "
                  f"it (its heartbeat stood still for over {2 * tune.heartbeat_s} s: a paused process or an "
                  "overloaded machine); its result is dropped and another trial replaces it", file=sys.stderr)
        ran += 1


def _report_failure(study: optuna.Study, asked: list[optuna.Trial], callbacks: list[Callable[..., None]]) -> None:
    """Hand the trial that an error (its own, or Ctrl-C) ended as FAIL to ``callbacks``, which Optuna calls only
    for trials it finished itself (so a failed trial gets its MLflow run too); their own errors are suppressed, so
    that the trial's error is the one reported."""
    with contextlib.suppress(Exception):
        stored = study.get_trials(deepcopy=False)[asked[0].number] if asked else None
        if stored is not None and stored.state == TrialState.FAIL:
            for callback in callbacks:
                with contextlib.suppress(Exception):
                    callback(study, stored)


def _asked_trial(trial: optuna.Trial, asked: list[optuna.Trial], ctx: TrialContext) -> float | tuple[float, float]:
    """``run_trial``, after noting the trial in ``asked``: Optuna's error on a reclaimed trial does not name it."""
    asked.append(trial)
    return run_trial(trial, ctx)


def reclaimed(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether another process failed ``trial`` as stale while this one ran it: it is FAIL without an error of its own
    and did not step back as surplus (then the objective's next write, or Optuna's tell, raises)."""
    stored = study.get_trials(deepcopy=False)[trial.number]
    return stored.state == TrialState.FAIL and RAISED not in stored.user_attrs and SURPLUS not in stored.user_attrs


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker process needs to join a study (picklable, for spawned processes)."""

    params: dict[str, Any]  # to_dict of the trial base configuration
    storage: str
    study_name: str
    fingerprint: str
    dense_dir: str
    snapshot: str | None  # a data snapshot folder; None = load the configured dataset
    tracking_uri: str
    worker: int  # offset of the sampler seed: 0 for the study's creator or a lone resumer (reproducible), see runner
    keep_dir: str | None = None  # where completed trials keep their models (None: nowhere)


def work(job: WorkerJob, data: DataBundle | None = None, dense: DenseArtifacts | None = None) -> int:
    """Join the study and run trials until its budget is met (the body of every worker)."""
    from ballot.experiment import load_dense, prepare_data
    from ballot.tracking import connect
    from ballot.tuning.mlflow_runs import TrialLogger

    cfg = experiment_from_params(job.params)
    if data is None:
        if job.snapshot:
            from ballot.snapshot import load_snapshot

            data = load_snapshot(job.snapshot)
        else:
            data = prepare_data(cfg)
    dense = dense if dense is not None else load_dense(job.dense_dir)
    logger = TrialLogger(connect(job.tracking_uri))
    storage = make_storage(job.storage, cfg.tune.heartbeat_s, on_stale=logger)
    study, _ = open_study(cfg, storage, job.study_name, job.fingerprint, job.worker)
    ctx = TrialContext(cfg, data, dense, cfg.tune.knobs(), float(study.user_attrs[DENSE_ACC_ATTR]),
                       Path(job.keep_dir) if job.keep_dir else None)
    return run_worker(study, ctx, callbacks=[logger], worker=job.worker)


def _spawned(job: WorkerJob, parent: int) -> None:
    """A spawned worker, which ends when its parent (pid ``parent``) does; bad input (a UserError) ends it with one
    line on stderr and exit code 2, like the CLI."""
    terminate_with_parent(parent)
    torch.set_num_threads(1)  # workers share the cores; two threads each would contend (docs/tuning.md)
    try:
        work(job)
    except UserError as error:
        print(f"ballot: error: {multiprocessing.current_process().name}: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a terminal's Ctrl-C: the parent says so, once
        sys.exit(130)


WORKER_SELF_STOP_S = 3  # how long interrupted workers are given to stop by themselves before they get SIGTERM
WORKER_GRACE_S = 30  # then, before they get SIGKILL


def run_workers(job: WorkerJob, count: int, study: optuna.Study, n_trials: int) -> None:
    """``count`` worker processes (spawned, one torch thread each) on ``study``. When a worker fails (a kill, an
    error) but the others still brought the study to ``n_trials`` finished trials, a warning names it; TuneError
    when the budget is not met."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_spawned, args=(WorkerJob(**{**job.__dict__, "worker": job.worker + i}),
                                                        os.getpid()), name=f"tune-worker-{i}") for i in range(count)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:  # also when the signal reached this process alone: no worker trials on (after a
        stop_children(processes, WORKER_SELF_STOP_S, WORKER_GRACE_S)  # terminal's Ctrl-C they record the
        raise                                                          # interrupted trial as failed and stop)
    failed = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode != 0)
    if not failed:
        return
    if trial_counts(study)[0] < n_trials:
        raise TuneError(f"worker process(es) failed: {failed}; the study can be resumed")
    print(f"warning: worker process(es) failed: {failed}; the other workers finished the study's {n_trials} "
          "trials", file=sys.stderr)
