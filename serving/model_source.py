"""Resolve a model URI to a local ONNX file: a plain path, or a version in the MLflow model registry.

Registry URIs are ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``. mlflow is imported only for
them, so serving a file needs no MLflow at all.

The markdown model card comes along when there is one: ``model_card.md`` next to a plain file, or the
``model/model_card.md`` artifact of the run that registered the version (the pipeline's register stage logs it).
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from serving.errors import ModelSourceError
from serving.registration import incomplete_reason

REGISTRY_SCHEME = "models:/"
CARD_FILE, CARD_FOLDER = "model_card.md", "model"  # the card's artifact path in the run that registered the version
MAX_CARD_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """A local ONNX file and where it came from."""

    path: Path
    uri: str
    name: str
    version: str | None = None
    alias: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)  # registry version tags (strings)
    card_markdown: str | None = None  # the model card (markdown), None when the model has none


@dataclass(frozen=True)
class RegistryRef:
    name: str
    alias: str | None = None
    version: str | None = None


def parse_registry_uri(uri: str) -> RegistryRef:
    """Split ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; ModelSourceError for anything else."""
    rest = uri[len(REGISTRY_SCHEME):] if uri.startswith(REGISTRY_SCHEME) else ""
    usage = f"model URI '{uri}' must look like models:/NAME@ALIAS or models:/NAME/VERSION"
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in name and "/" not in alias:
            return RegistryRef(name, alias=alias)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit() and "/" not in name:
            return RegistryRef(name, version=version)
    raise ModelSourceError(usage)


@contextmanager
def fetch_model(uri: str, tracking_uri: str | None = None, timeout: float = 15.0) -> Iterator[ModelSource]:
    """Yield the model behind ``uri``; a registry model lives in a temp folder until the block exits. Each
    registry request may take ``timeout`` seconds, without retries."""
    if not uri.startswith(REGISTRY_SCHEME):
        yield _from_file(uri)
        return
    ref = parse_registry_uri(uri)
    with tempfile.TemporaryDirectory(prefix="ballot-model-") as folder, bounded_requests(timeout):
        yield _from_registry(uri, ref, tracking_uri, Path(folder))


@contextmanager
def bounded_requests(timeout: float) -> Iterator[None]:
    """MLflow's HTTP requests time out after ``timeout`` seconds and are not retried (its defaults wait minutes
    on an unreachable server); a value the operator set in the environment wins."""
    wanted = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout))), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    added = {key: value for key, value in wanted.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _from_file(uri: str) -> ModelSource:
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"model file '{path}' not found (the model URI is neither an existing .onnx file "
                               f"nor a {REGISTRY_SCHEME}NAME@ALIAS registry URI)")
    card = path.with_name(CARD_FILE)
    return ModelSource(path=path, uri=uri, name=path.stem, card_markdown=_read_card(card) if card.is_file() else None)


def _read_card(path: Path) -> str:
    """The text of a model card file; ModelSourceError when it is too large, unreadable or not UTF-8."""
    try:
        size = path.stat().st_size
        if size > MAX_CARD_BYTES:
            raise ModelSourceError(f"model card '{path}' holds {size} bytes, more than the {MAX_CARD_BYTES} a card "
                                   "may take")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ModelSourceError(f"model card '{path}' is not UTF-8 text ({error.reason} at byte {error.start})"
                               ) from None
    except OSError as error:
        raise ModelSourceError(f"model card '{path}' cannot be read ({error.strerror})") from None


def sqlite_path(uri: str) -> Path | None:
    """The database file an ``sqlite:///`` tracking or registry URI names (relative or absolute); None for others."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _from_registry(uri: str, ref: RegistryRef, tracking_uri: str | None, folder: Path) -> ModelSource:
    try:
        import mlflow
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise ModelSourceError(f"serving '{uri}' needs MLflow (pip install mlflow-skinny); "
                               "or point the model URI at an .onnx file") from None
    registry = tracking_uri or mlflow.get_registry_uri()
    where = f"the registry at {registry}"
    if (database := sqlite_path(registry)) and not database.is_file():
        raise ModelSourceError(f"{where}: the sqlite file does not exist (check the tracking URI; serving never "
                               "creates a registry)")
    if registry.startswith(("http://", "https://")):  # a server may keep us waiting: say for what
        print(f"fetching {_describe(ref)} from {where} (each request gives up after "
              f"{os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT']} s)", file=sys.stderr, flush=True)
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        registered = client.get_registered_model(ref.name)
        version = ref.version or _alias_version(ref, registered.aliases, where)
        model_version = client.get_model_version(ref.name, version)
        incomplete = incomplete_reason(client, model_version)
        if incomplete:
            raise ModelSourceError(f"{_describe(ref)} in {where}: {incomplete}; serve another version")
        artifacts = client.get_model_version_download_uri(ref.name, version)
        local = Path(download_artifacts(artifact_uri=artifacts, dst_path=str(folder), tracking_uri=tracking_uri))
        card = _download_card(client, model_version.run_id, folder / "card", tracking_uri)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelSourceError(f"{_describe(ref)} not found in {where}: {error.message}") from None
        raise ModelSourceError(f"cannot fetch {_describe(ref)} from {where}: {error.message}") from None
    except OSError as error:
        raise ModelSourceError(f"cannot download {_describe(ref)} from {where}: {error}") from None
    return ModelSource(path=_onnx_file(local, ref), uri=uri, name=ref.name, version=str(model_version.version),
                       alias=ref.alias, tags=dict(model_version.tags), card_markdown=card)


def _download_card(client: Any, run_id: str | None, folder: Path, tracking_uri: str | None) -> str | None:
    """The model card logged by the run that registered the version; None when it logged none.

    The run's own artifact store is read (``runs:/`` URIs would mix in the logged model's files)."""
    from mlflow.artifacts import download_artifacts, list_artifacts

    if not run_id:
        return None
    root = client.get_run(run_id).info.artifact_uri.rstrip("/")
    listed = list_artifacts(f"{root}/{CARD_FOLDER}", tracking_uri=tracking_uri)
    if CARD_FILE not in {Path(entry.path).name for entry in listed}:
        return None
    folder.mkdir()
    return _read_card(Path(download_artifacts(artifact_uri=f"{root}/{CARD_FOLDER}/{CARD_FILE}", dst_path=str(folder),
                                              tracking_uri=tracking_uri)))


def _alias_version(ref: RegistryRef, aliases: Mapping[str, Any], where: str) -> str:
    if ref.alias not in aliases:
        known = ", ".join(f"{alias} -> version {v}" for alias, v in sorted(aliases.items())) or "none"
        raise ModelSourceError(f"registered model '{ref.name}' in {where} has no alias '{ref.alias}' "
                               f"(its aliases: {known}); promote a version to it or serve another alias")
    return str(aliases[ref.alias])


def _describe(ref: RegistryRef) -> str:
    which = f"alias '{ref.alias}'" if ref.alias else f"version {ref.version}"
    return f"registered model '{ref.name}' ({which})"


def _onnx_file(folder: Path, ref: RegistryRef) -> Path:
    """The ONNX file named by the MLmodel file's onnx flavour."""
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise ModelSourceError(f"{_describe(ref)} has no MLmodel file: it was not logged with mlflow.onnx.log_model")
    try:
        content = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ModelSourceError(f"{_describe(ref)}: its MLmodel file cannot be read as YAML "
                               f"({str(error).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise ModelSourceError(f"{_describe(ref)}: its MLmodel file is not a YAML mapping")
    flavors = content.get("flavors") or {}
    data = (flavors.get("onnx") or {}).get("data")
    if not data:
        raise ModelSourceError(f"{_describe(ref)} is not an ONNX model (flavors: {sorted(flavors)}); "
                               "log it with mlflow.onnx.log_model")
    path = folder / data
    if not path.is_file():
        raise ModelSourceError(f"{_describe(ref)}: the MLmodel file names '{data}', which is missing")
    return path
