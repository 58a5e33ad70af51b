"""The summary block of the last `dvc repro`, from the stages' metric files (what `make run` ends with)."""

from __future__ import annotations

import sys
from typing import Any

from ballot.errors import StorageError
from ballot.summary import summary
from pipelines.common import EXPORT, METRICS, PRUNE, REGISTER, REPORT_FILE, read_json


def collect() -> dict[str, Any]:
    """metrics.json with the method (prune's metrics), the record of competing final trainings (prune's details, when
    they ran), the ONNX size (export.json) and the registered version (register.json); the last two only when those
    stages have run."""
    metrics = {**read_json(METRICS), "method": read_json(PRUNE / "metrics.json")["method"]}
    if (PRUNE / "details.json").is_file():
        metrics["final_choice"] = read_json(PRUNE / "details.json").get("final_choice")
    if (EXPORT / REPORT_FILE).is_file():
        metrics["onnx_bytes"] = read_json(EXPORT / REPORT_FILE)["onnx_bytes"]
    if REGISTER.is_file():
        metrics["registration"] = read_json(REGISTER)
    return metrics


def main() -> int:
    try:
        print(summary(collect()))
    except StorageError as error:
        print(f"summary: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
