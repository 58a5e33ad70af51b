"""The search space applied to a configuration: trial bases, edge checks, best-parameter files.

The spec's format and parsing live in ``ballot.knobs`` (the ground floor, so config can validate it).

Only Ballot's own knobs can be tuned: every trial re-uses the study's one dense model, so dense-phase settings
(``train_dense.*``, including ``rewind_iter``, which fixes theta_k) and the data cannot vary per trial.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import yaml

from ballot.config import ExperimentConfig, apply_overrides, experiment_from_params, load_yaml, to_dict
from ballot.errors import ConfigError
from ballot.knobs import TUNABLE, Knob
from ballot.storage import write_text


def with_values(cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """``cfg`` with each dotted key set to its value, validated like params.yaml (ConfigError names the key)."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in values.items()]
    return experiment_from_params(apply_overrides(to_dict(cfg), overrides))


OBJECTIVE_WEIGHT_KEY = "prune.ballot.objective_mcd_weight"


def trial_base(cfg: ExperimentConfig) -> ExperimentConfig:
    """The configuration every trial starts from: ``cfg`` with Ballot as the pruning method, whose plateau schedule
    and choice of the kept final training watch the study's own objective (tune.mcd_weight)."""
    return with_values(cfg, {"prune.method": "ballot", OBJECTIVE_WEIGHT_KEY: cfg.tune.mcd_weight})


def check_space(cfg: ExperimentConfig) -> list[Knob]:
    """The knobs of ``cfg.tune.space``, each extreme value checked against the whole configuration."""
    knobs = cfg.tune.knobs()
    base = trial_base(cfg)
    for knob in knobs:
        for value in knob.edges():
            try:
                with_values(base, {knob.key: value})
            except ConfigError as error:
                raise ConfigError(f"tune.space.{knob.key}: value {value!r} is not valid with the other settings, "
                                  f"so take it out of the space ({error})") from None
    return knobs


def current_values(cfg: ExperimentConfig, knobs: list[Knob]) -> dict[str, Any]:
    """The value each knob has in ``cfg`` (Ballot's configured defaults)."""
    values = {}
    for knob in knobs:
        node: Any = to_dict(cfg)
        for part in knob.key.split("."):
            node = node[part]
        values[knob.key] = node
    return values


def write_best(path: str | Path, values: Mapping[str, Any], info: Mapping[str, Any]) -> Path:
    """Atomically write best_params.yaml: ``info`` (study, trial, rule, metrics) and the chosen ``params``."""
    header = "# Written by the tune stage / `ballot tune` (docs/tuning.md). `params` override prune.ballot.*\n"
    body = yaml.safe_dump({**info, "params": dict(values)}, sort_keys=False)
    return write_text(path, header + body)


def load_best(path: str | Path) -> dict[str, Any]:
    """The ``params`` of a best_params.yaml, checked to be Ballot knobs; ConfigError when malformed."""
    data = load_yaml(path)
    values = data.get("params")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a 'params' mapping of {TUNABLE}* keys, got {values!r}")
    bad = sorted(key for key in values if not str(key).startswith(TUNABLE))
    if bad:
        raise ConfigError(f"{path}: params may only set {TUNABLE}* keys, found {bad}")
    return values


def apply_best(cfg: ExperimentConfig, path: str | Path) -> tuple[ExperimentConfig, dict[str, Any]]:
    """(``cfg`` with the tuned values of ``path`` applied, those values) when ``tune.use_best`` is on, the method
    is Ballot and the file exists; otherwise (``cfg``, {})."""
    if not (cfg.tune.use_best and cfg.prune.method == "ballot" and Path(path).is_file()):
        return cfg, {}
    values = load_best(path)
    return with_values(cfg, values), values
