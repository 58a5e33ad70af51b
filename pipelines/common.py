"""What every stage shares: validated params, replace-on-success output folders, stage paths, error exit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from ballot import storage
from ballot.config import ExperimentConfig, experiment_from_params, load_yaml
from ballot.errors import UserError
from ballot.experiment import check_experiment

PARAMS = Path("params.yaml")
DVC_LOCK = Path("dvc.lock")
DATA = Path("artifacts/data")
DENSE = Path("artifacts/dense")
PRUNE = Path("artifacts/prune")
EXPORT = Path("artifacts/export")
MODEL_FILE, REPORT_FILE, EXAMPLE_FILE = "model.onnx", "export.json", "input_example.safetensors"  # in EXPORT
METRICS = Path("metrics.json")
PLOTS = Path("plots")
REGISTER = Path("artifacts/register.json")
BEST_PARAMS = Path("best_params.yaml")
STUDY_DB = Path("artifacts/tune/study.db")
TUNE_REPORT = Path("artifacts/tune/report")
TUNE_CHOSEN = Path("artifacts/tune/chosen")  # the chosen trial's model (ballot.tuning.kept)
SWEEP = Path("sweep")
MODEL_CARD = Path("artifacts/model_card.md")
CARD_FILE = "model_card.md"  # beside model.onnx in EXPORT, where `ballot serve` looks for a plain file's card


def load_config(path: Path = PARAMS) -> ExperimentConfig:
    """The whole params file, validated: unknown groups or keys, bad values, unknown names and an unusable
    device all fail here."""
    cfg = experiment_from_params(load_yaml(path))
    check_experiment(cfg)
    return cfg


def read_json(path: Path) -> Any:
    """A JSON file written by an earlier stage; StorageError when it is missing or malformed."""
    return storage.read_json(path, f"'{path}' not found: run the stage that writes it first (dvc repro)")


def run_stage(name: str, body: Callable[[ExperimentConfig], None]) -> None:
    """Validate params.yaml, then run ``body``; a user error prints '<name>: error: ...' and exits with 2, an
    interrupt (Ctrl-C) '<name>: interrupted' and exits with 130, as the CLI does."""
    try:
        body(load_config())
    except UserError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
