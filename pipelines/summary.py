"""The summary block of the last `dvc repro`, from the stages' metric files (what `make run` ends with)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from ballot.errors import StorageError, UserError
from ballot.summary import summary
from ballot.tracking import alias_version, connect, file_sha256
from serving.model_source import sqlite_path
from pipelines.common import EXPORT, METRICS, MODEL_FILE, PRUNE, REGISTER, REPORT_FILE, read_json

METRIC_KEYS = ("density", "acc", "cwv", "mcd", "worst_class")  # what the block reads from metrics.json
JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


def read_object(path: Path, keys: Sequence[str] = ()) -> dict[str, Any]:
    """A stage's JSON object file; StorageError naming ``path`` when it holds another JSON value or lacks one of
    ``keys``."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise StorageError(f"'{path}' holds {JSON_TYPES[type(data)]}, not a JSON object: run the stage that "
                           "writes it (dvc repro)")
    missing = [key for key in keys if key not in data]
    if missing:
        raise StorageError(f"'{path}' has no '{missing[0]}': run the stage that writes it (dvc repro)")
    return data


def exported(registration: dict[str, Any]) -> bool:
    """Whether ``registration`` (register.json) registered the current export: its ``onnx_sha256`` is that of
    artifacts/export/model.onnx. register.json persists through a failed register stage, and then names a version of
    an earlier export."""
    model = EXPORT / MODEL_FILE
    return model.is_file() and registration.get("onnx_sha256") == file_sha256(model)


def collect() -> dict[str, Any]:
    """metrics.json with the method (prune's metrics), the record of competing final trainings (prune's details, when
    they ran), the ONNX size (export.json) and the registered version (register.json, marked ``stale`` when it
    registered another file than the current export, else with the version its alias points at now); the last two
    only when those stages have run."""
    metrics = {**read_object(METRICS, METRIC_KEYS), "method": read_object(PRUNE / "metrics.json", ["method"])["method"]}
    if (PRUNE / "details.json").is_file():
        metrics["final_choice"] = read_object(PRUNE / "details.json").get("final_choice")
    if (EXPORT / REPORT_FILE).is_file():
        metrics["onnx_bytes"] = read_object(EXPORT / REPORT_FILE, ["onnx_bytes"])["onnx_bytes"]
    if REGISTER.is_file():
        registration = read_object(REGISTER, ["name", "version", "alias"])
        stale = not exported(registration)
        checked = not stale and bool(registration.get("tracking_uri"))
        metrics["registration"] = {**registration, "stale": stale, **(alias_now(registration) if checked else {})}
    return metrics


def alias_now(registration: dict[str, Any]) -> dict[str, Any]:
    """{"alias_now": the version the registration's alias points at in the registry now, None when none} (another
    run, a `dvc exp run` or `ballot register`, may have moved it since), or {"alias_unchecked": why it could not be
    read}."""
    uri = registration["tracking_uri"]
    if (database := sqlite_path(uri)) and not database.is_file():
        return {"alias_unchecked": f"the tracking store {uri} is gone"}  # connecting would create an empty one
    try:
        connect(uri)
        return {"alias_now": alias_version(registration["name"], registration["alias"])}
    except UserError as error:
        return {"alias_unchecked": str(error)}


def main() -> int:
    try:
        print(summary(collect()))
    except StorageError as error:
        print(f"summary: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
