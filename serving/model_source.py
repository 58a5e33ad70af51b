"""Resolve a model URI to a local ONNX file: a plain path, or a version in the MLflow model registry.

Registry URIs are ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``. mlflow is imported only for
them, so serving a file needs no MLflow at all.
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

REGISTRY_SCHEME = "models:/"


@dataclass(frozen=True)
class ModelSource:
    """A local ONNX file and where it came from."""

    path: Path
    uri: str
    name: str
    version: str | None = None
    alias: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)  # registry version tags (strings)


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
    with tempfile.TemporaryDirectory(prefix="ballot-model-") as folder, _bounded_requests(timeout):
        yield _from_registry(uri, ref, tracking_uri, Path(folder))


@contextmanager
def _bounded_requests(timeout: float) -> Iterator[None]:
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
    return ModelSource(path=path, uri=uri, name=path.stem)


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
    if registry.startswith("sqlite:///") and not Path(registry.removeprefix("sqlite:///")).is_file():
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
        artifacts = client.get_model_version_download_uri(ref.name, version)
        local = Path(download_artifacts(artifact_uri=artifacts, dst_path=str(folder), tracking_uri=tracking_uri))
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelSourceError(f"{_describe(ref)} not found in {where}: {error.message}") from None
        raise ModelSourceError(f"cannot fetch {_describe(ref)} from {where}: {error.message}") from None
    except OSError as error:
        raise ModelSourceError(f"cannot download {_describe(ref)} from {where}: {error}") from None
    return ModelSource(path=_onnx_file(local, ref), uri=uri, name=ref.name, version=str(model_version.version),
                       alias=ref.alias, tags=dict(model_version.tags))


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
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
    data = (flavors.get("onnx") or {}).get("data")
    if not data:
        raise ModelSourceError(f"{_describe(ref)} is not an ONNX model (flavors: {sorted(flavors)}); "
                               "log it with mlflow.onnx.log_model")
    path = folder / data
    if not path.is_file():
        raise ModelSourceError(f"{_describe(ref)}: the MLmodel file names '{data}', which is missing")
    return path
