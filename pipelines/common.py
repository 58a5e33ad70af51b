"""What every stage shares: validated params, replace-on-success output folders, stage paths, error exit."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ballot.cli import USER_ERRORS
from ballot.config import ExperimentConfig, experiment_from_params, load_yaml
from ballot.experiment import check_names
from ballot.storage import StorageError

PARAMS = Path("params.yaml")
DATA = Path("artifacts/data")
DENSE = Path("artifacts/dense")
PRUNE = Path("artifacts/prune")
EXPORT = Path("artifacts/export")
METRICS = Path("metrics.json")
PLOTS = Path("plots")
REGISTER = Path("artifacts/register.json")


def load_config(path: Path = PARAMS) -> ExperimentConfig:
    """The whole params file, validated: unknown groups or keys, bad values, unknown names and an unusable
    device all fail here."""
    cfg = experiment_from_params(load_yaml(path))
    check_names(cfg)
    return cfg


def read_json(path: Path) -> Any:
    """A JSON file written by an earlier stage; StorageError when it is missing or malformed."""
    if not path.is_file():
        raise StorageError(f"'{path}' not found: run the stage that writes it first (dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StorageError(f"'{path}' is not valid JSON: {error}") from None


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """An empty temp folder beside ``final`` that takes ``final``'s place only if the block succeeds.

    On failure the temp folder is removed and ``final`` is left exactly as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        old = tmp.with_suffix(".old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run_stage(name: str, body: Callable[[ExperimentConfig], None],
              errors: tuple[type[Exception], ...] = ()) -> None:
    """Validate params.yaml, then run ``body``; a user error (or one of ``errors``) prints
    '<name>: error: ...' and exits with 2."""
    try:
        body(load_config())
    except (*USER_ERRORS, *errors) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(2)
