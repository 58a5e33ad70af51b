"""Shared fixtures: a tiny digits experiment that trains in about a second."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from ballot.config import FLOORED_SCHEDULES, ExperimentConfig, apply_overrides, experiment_from_params  # noqa: E402
from ballot.experiment import prepare_data, train_dense  # noqa: E402

TINY = [
    "base.dataset=digits", "base.model=mlp", "base.density=0.1", "base.device=cpu",
    "train_dense.epochs=3", "train_dense.rewind_iter=5", "train_dense.batch_size=64",
    "prune.retrain.epochs=2", "prune.retrain.batch_size=64", "prune.lth_rounds=2",
    "prune.ballot.obs_epochs=2", "prune.ballot.refine_train.epochs=2", "prune.ballot.refine_train.batch_size=64",
    *(f"{schedule}.min_steps=0" for schedule in FLOORED_SCHEDULES),
]


def tiny_config(*overrides: str) -> ExperimentConfig:
    """The tiny digits experiment with extra 'group.key=value' overrides."""
    return experiment_from_params(apply_overrides({}, TINY + list(overrides)))


@pytest.fixture(scope="session")
def tiny_data():
    return prepare_data(tiny_config())


@pytest.fixture(scope="session")
def tiny_dense(tiny_data):
    _, dense, _ = train_dense(tiny_config(), tiny_data, progress=False)
    return dense
