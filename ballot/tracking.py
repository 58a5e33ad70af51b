"""MLflow: where runs go, what a run records, and the registry contract the serving side relies on.

Registry contract: the ONNX model is logged as ``name="model"`` with a signature and an input example,
registered as a new version of the configured name, given the alias ``challenger`` (or one chosen with
`ballot register --alias`) and tagged with ``VERSION_TAG_KEYS`` and, when the model card records it,
``dense_acc`` (string values; lists JSON-encoded); the run then records the alias move (serving.registration has
the rule for a complete version). Only ``ballot promote`` moves ``champion``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np

from ballot.config import flatten
from ballot.errors import RegistryError, StorageError
from ballot.storage import pid_alive, process_start
from serving.model_source import bounded_requests, sqlite_path
from serving.registration import REGISTERED_TAG, is_complete
from serving.settings import Settings

CHALLENGER, CHAMPION = "challenger", "champion"
VERSION_TAG_KEYS = ("density", "acc", "cwv", "mcd", "worst_class", "dataset", "method", "model", "class_names",
                    "input_shape")
OPTIONAL_TAG_KEYS = ("dense_acc",)
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def check_names(name: str, alias: str) -> None:
    """RegistryError unless MLflow accepts the model ``name`` and ``alias`` (its own validators: MLflow states the
    rules) and the alias is not ``champion`` (only the gate moves that one)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    if alias == CHAMPION:
        raise RegistryError(f"alias '{CHAMPION}' moves only through `ballot promote`, which checks accuracy and "
                            f"fairness first; register with another alias, then promote")
    try:
        validation._validate_model_name(name)
        validation._validate_model_alias_name(alias)
        validation._validate_model_alias_name_reserved(alias)
    except MlflowException as error:
        raise RegistryError(f"MLflow refuses model name '{name}' / alias '{alias}': {error.message}") from None


def resolve_tracking_uri(configured: str, explicit: str | None = None) -> str:
    """``explicit`` (a command-line flag) if given, else MLFLOW_TRACKING_URI when set, else ``configured``."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or configured


SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_store(uri: str) -> None:
    """StorageError when ``uri`` names an existing file that is not an SQLite database (MLflow would fail deep
    inside SQLAlchemy); a missing file is fine: MLflow creates it."""
    path = sqlite_path(uri)
    if path is None:
        return
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as handle:
            if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise StorageError(f"tracking store '{path}' is not an SQLite database; point the tracking URI at "
                                   "an MLflow sqlite file or server")


def check_file_store(uri: str) -> None:
    """StorageError when ``uri`` is a path or ``file:`` URI, MLflow's filesystem store: MLflow 3 refuses it (it is
    in maintenance mode) with a trace from deep inside the client, unless MLFLOW_ALLOW_FILE_STORE opts back in."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    from mlflow.utils.uri import is_local_uri

    if is_local_uri(uri, is_tracking_or_registry_uri=True):  # MLflow's own test ('databricks' is not a path)
        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise StorageError(f"tracking URI '{uri}' is a file store, which MLflow 3 no longer supports here: use "
                               "sqlite:///path/to/mlflow.db or an http(s):// tracking server")


def check_store(uri: str) -> None:
    """The checks of ``uri`` that need no network (``check_file_store``, ``check_sqlite_store``): a command can run
    them before it writes anything."""
    check_file_store(uri)
    check_sqlite_store(uri)


SERVER_PROBE_TIMEOUT_S = Settings.registry_timeout  # as long as `ballot serve` lets each start-up request take


def _failure(error: BaseException, timeout_s: float) -> str:
    """In a few words, why a request got no answer: a timeout, the reason in a requests connection error's long text
    ('Connection refused'), else the kind of failure."""
    text = str(error)
    if "TimeoutError" in text or "timed out" in text:  # requests wraps a read timeout in a ConnectionError
        return f"no answer within {timeout_s:g} s"
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"Caused by (\w+)", text)
    return found.group(1) if found else type(error).__name__


def check_server(client: Any, uri: str, timeout_s: float = SERVER_PROBE_TIMEOUT_S) -> None:
    """StorageError when the tracking server at ``uri`` does not answer one request within ``timeout_s`` seconds;
    any answer will do, an error status included. (MLflow alone retries for about four minutes, then fails on
    whatever it was asked, which promote took for a missing version.)"""
    import requests
    from mlflow.exceptions import MlflowException

    with bounded_requests(timeout_s):
        try:
            client.search_experiments(max_results=1)
        except MlflowException as error:
            cause = error.__cause__ or error.__context__
            if isinstance(cause, (requests.ConnectionError, requests.Timeout)):
                reason = _failure(cause, float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]))
                raise StorageError(f"cannot reach the tracking server {uri}: {reason}") from None


@contextlib.contextmanager
def _sqlite_setup_lock(uri: str) -> Iterator[bool]:
    """For an ``sqlite:///`` store, an exclusive lock on its folder (released when the process ends, however it
    ends), held while a client opens it: MLflow creates or upgrades a store's tables when a process first opens it,
    and two processes doing it at once break each other's schema migration. Yields whether ``uri`` is one."""
    database = sqlite_path(uri)
    if database is None:
        yield False
        return
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401  imported before the lock: most of the time
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  a client takes to open a store that exists

    handle = None
    with contextlib.suppress(OSError):  # no folder (MLflow's own error says so), or one this user may not list
        handle = os.open(database.parent, os.O_RDONLY)
        fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield True
    finally:
        if handle is not None:
            os.close(handle)


def connect(uri: str):
    """Point MLflow at ``uri`` (tracking and registry) and return a client for it; StorageError, before anything
    is written, for a store MLflow cannot use or a tracking server that does not answer (``check_server``)."""
    import mlflow

    check_store(uri)
    with _sqlite_setup_lock(uri) as sqlite:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # opens the tracking store
        if sqlite:
            client.search_registered_models(max_results=1)  # and the registry's, which MLflow opens on first use
    if urlparse(uri).scheme in ("http", "https"):
        check_server(client, uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return client


def numeric_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested metrics mapping, flattened, under MLflow-safe names."""
    return {_BAD_KEY_CHARS.sub("_", key): float(value) for key, value in flatten(tree, prefix).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def tag_value(value: Any) -> str:
    """Strings as they are, everything else JSON-encoded (the registry's tag format)."""
    return value if isinstance(value, str) else json.dumps(value)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state(folder: str | Path = ".") -> dict[str, str]:
    """{'git_commit': HEAD or 'unknown', 'git_dirty': 'true' / 'false' / 'unknown'} for ``folder``."""
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"git_commit": commit or "unknown", "git_dirty": dirty}


@dataclass(frozen=True)
class Registration:
    """A registered model version and the run that logged it."""

    name: str
    version: str
    alias: str
    run_id: str
    model_uri: str
    tracking_uri: str


def version_tags(card: Mapping[str, Any], source: str | Path) -> dict[str, Any]:
    """The registry's version tags from a model card (an exported file's metadata); StorageError naming
    ``source`` when the card lacks one of ``VERSION_TAG_KEYS``."""
    missing = [key for key in VERSION_TAG_KEYS if key not in card]
    if missing:
        raise StorageError(f"'{source}' has no model card entries {missing}: write it with `ballot export` "
                           f"or the export stage")
    return {key: card[key] for key in (*VERSION_TAG_KEYS, *OPTIONAL_TAG_KEYS) if key in card}


def register_onnx(onnx_path: str | Path, name: str, example: np.ndarray, tags: Mapping[str, Any],
                  alias: str = CHALLENGER) -> Registration:
    """Inside the active run: log the ONNX file as ``model``, register it as a new version of ``name`` created
    with ``tags``, then point ``alias`` at it (see the module docstring)."""
    import mlflow
    import mlflow.onnx
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_onnx needs an active MLflow run")
    proto = onnx.load_model(str(onnx_path))
    example = np.ascontiguousarray(example, dtype=np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    logits = session.run([output_name], {input_name: example})[0]
    info = mlflow.onnx.log_model(onnx_model=proto, name="model", signature=infer_signature(example, logits),
                                 input_example=example)
    # One create call with every tag: a reader sees the version whole or not at all. The alias moves last, so a
    # kill before it leaves the alias on the previous, complete version.
    created = mlflow.register_model(info.model_uri, name, tags={k: tag_value(v) for k, v in tags.items()})
    version, client = str(created.version), mlflow.MlflowClient()
    try:
        client.set_registered_model_alias(name, alias, version)
    except BaseException:  # a version no alias reaches is half a registration: take it back (a kill: fail_orphan_runs)
        with contextlib.suppress(Exception):
            client.delete_model_version(name, version)
        raise
    try:  # complete even once the alias moves on (a kill now); the version is live already, so a refusal only warns
        client.set_tag(run.info.run_id, REGISTERED_TAG, version)
    except Exception as error:  # noqa: BLE001  whatever the store says, the registration itself succeeded
        print(f"warning: could not tag run {run.info.run_id} with {REGISTERED_TAG} ({type(error).__name__}: {error}); "
              "the registration is complete", file=sys.stderr)
    return Registration(name, version, alias, run.info.run_id, f"models:/{name}@{alias}", mlflow.get_tracking_uri())


HOST_TAG, PID_TAG, PID_START_TAG = "ballot.host", "ballot.pid", "ballot.pid_start"
EXPERIMENTS_PER_SEARCH = 100  # experiment ids per runs search (a tracking server may cap a request's list)


def _owner() -> dict[str, str]:
    """Tags naming the process of a run, so that a later run can tell it was killed."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: process_start(os.getpid()) or ""}


def _owner_gone(tags: Mapping[str, str], host: str) -> bool:
    """Whether the process a run's tags name, on this host, is gone: no such pid, or the pid now belongs to a process
    that started at another time (a container restarted under the same hostname reuses low pids)."""
    pid, started = tags.get(PID_TAG, ""), tags.get(PID_START_TAG, "")
    if tags.get(HOST_TAG) != host or not pid.isdigit():
        return False
    return not pid_alive(int(pid)) or bool(started) and process_start(int(pid)) != started


def fail_orphan_runs() -> list[str]:
    """End the RUNNING runs, in every experiment, whose process on this host no longer exists (a killed register):
    delete the model versions such a run created that are not complete (serving.registration: killed before the
    alias moved) and end it as FINISHED when every version it created is complete, else as FAILED; returns the runs'
    ids."""
    import mlflow

    client, ended = mlflow.MlflowClient(), []
    host = socket.gethostname()
    mine = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    ids = [experiment.experiment_id for experiment in _every_page(client.search_experiments)]
    for chunk in (ids[start:start + EXPERIMENTS_PER_SEARCH] for start in range(0, len(ids), EXPERIMENTS_PER_SEARCH)):
        for run in _every_page(client.search_runs, chunk, filter_string=mine):
            if _owner_gone(run.data.tags, host):
                # search results leave aliases out: read each version whole
                versions = [client.get_model_version(hit.name, hit.version)
                            for hit in client.search_model_versions(f"run_id = '{run.info.run_id}'")]
                complete = [is_complete(version, run) for version in versions]
                for version, whole in zip(versions, complete):
                    if not whole:
                        client.delete_model_version(version.name, version.version)
                client.set_terminated(run.info.run_id, status="FINISHED" if versions and all(complete) else "FAILED")
                ended.append(run.info.run_id)
    return ended


def _every_page(search: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
    """Every result of an MLflow client search, page after page."""
    token = None
    while True:
        page = search(*args, page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def alias_version(name: str, alias: str) -> str | None:
    """The version ``alias`` of model ``name`` points at now (None when the model or the alias does not exist: MLflow
    reports the two with different error codes, so the model's alias table is read instead); RegistryError when the
    registry cannot be read."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        aliases = mlflow.MlflowClient().get_registered_model(name).aliases
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RegistryError(f"cannot read @{alias} of model '{name}' from the registry: {error.message}") from None
    version = aliases.get(alias)
    return None if version is None else str(version)


def find_registration(experiment: str, name: str, alias: str, run_tags: Mapping[str, str]) -> Registration | None:
    """The registration ``alias`` of ``name`` points at (complete, since the alias moves last) when a run of
    ``experiment`` carrying exactly ``run_tags`` registered it, else None: what a register stage killed after its run
    ended, before it recorded the registration, left for the next one to record instead of registering the same file
    again."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    number = alias_version(name, alias)
    if number is None:  # no such model or alias yet
        return None
    try:
        version = client.get_model_version(name, number)
        run = client.get_run(version.run_id) if version.run_id else None
    except MlflowException as error:
        raise RegistryError(f"cannot read version {number} of model '{name}' from the registry: {error.message}") \
            from None
    found = mlflow.get_experiment_by_name(experiment)
    if run is None or found is None or run.info.experiment_id != found.experiment_id:
        return None
    if any(run.data.tags.get(key) != value for key, value in run_tags.items()):
        return None
    return Registration(name, str(version.version), alias, run.info.run_id, f"models:/{name}@{alias}",
                        mlflow.get_tracking_uri())


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def register_run(onnx_path: str | Path, name: str, example: np.ndarray | None, card: Mapping[str, Any], *,
                 experiment: str, metrics: Mapping[str, float], alias: str = CHALLENGER,
                 tags: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None,
                 artifacts: Sequence[tuple[Path, str]] = (),
                 histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> Registration:
    """One MLflow run in ``experiment`` (tagged with the card's dataset, method and model, and ``tags``) that logs
    ``params``, ``metrics``, per-epoch ``histories`` (phase -> epoch records: '<phase>.<key>' at step = epoch) and
    ``artifacts`` ((file, artifact folder) pairs), then registers the ONNX file with the card's version tags
    (``register_onnx``); ``example`` None: one all-zero input of the card's ``input_shape``. The card, the name and
    the alias are checked before the run starts; MLflow's refusals come out as RegistryError."""
    import mlflow
    from mlflow.exceptions import MlflowException

    model_tags = version_tags(card, onnx_path)
    check_names(name, alias)
    if example is None:
        example = np.zeros((1, *card["input_shape"]), dtype=np.float32)
    try:
        mlflow.set_experiment(experiment)
        fail_orphan_runs()
        run_tags = {**{key: card[key] for key in ("dataset", "method", "model")}, **(tags or {}), **_owner()}
        run_name = f"{card['method']}-{card['model']}-d{card['density']:.3f}"
        with mlflow.start_run(run_name=run_name, tags=run_tags):
            if params:
                mlflow.log_params(params)
            mlflow.log_metrics(dict(metrics))
            for phase, records in (histories or {}).items():
                for record in records:
                    values = {f"{phase}.{k}": float(v) for k, v in record.items() if k != "epoch" and _finite(v)}
                    mlflow.log_metrics(values, step=int(record["epoch"]))
            for path, folder in artifacts:
                mlflow.log_artifact(str(path), artifact_path=folder)
            return register_onnx(onnx_path, name, example, model_tags, alias)
    except MlflowException as error:  # a deleted experiment, a store that refuses a value: one line, not a trace
        raise RegistryError(f"MLflow refused to register '{onnx_path}' as '{name}': {error.message}") from None
