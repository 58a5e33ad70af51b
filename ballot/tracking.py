"""MLflow: where runs go, what a run records, and the registry contract the serving side relies on.

Registry contract: the ONNX model is logged as ``name="model"`` with a signature and an input example,
registered as a new version of the configured name, given the alias ``challenger`` and tagged with
``VERSION_TAG_KEYS`` (string values; lists JSON-encoded). Only ``ballot promote`` moves ``champion``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ballot.config import flatten

CHALLENGER, CHAMPION = "challenger", "champion"
VERSION_TAG_KEYS = ("density", "acc", "cwv", "mcd", "worst_class", "dataset", "method", "model", "class_names",
                    "input_shape")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def resolve_tracking_uri(configured: str, explicit: str | None = None) -> str:
    """``explicit`` (a command-line flag) if given, else MLFLOW_TRACKING_URI when set, else ``configured``."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or configured


def connect(uri: str):
    """Point MLflow at ``uri`` (tracking and registry) and return a client for it."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


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


def register_onnx(onnx_path: str | Path, name: str, example: np.ndarray, tags: Mapping[str, Any]) -> Registration:
    """Inside the active run: log the ONNX file as ``model``, register a new version of ``name``, alias it
    ``challenger`` and set ``tags`` on the version (see the module docstring)."""
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
    info = mlflow.onnx.log_model(onnx_model=proto, name="model", registered_model_name=name,
                                 signature=infer_signature(example, logits), input_example=example)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, tag_value(value))
    return Registration(name, version, CHALLENGER, run.info.run_id, f"models:/{name}@{CHALLENGER}",
                        mlflow.get_tracking_uri())
