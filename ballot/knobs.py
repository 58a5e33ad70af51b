"""The typed search-space spec: ``tune.space`` entries parsed into Knobs (ground floor: imports only errors).

Format (docs/tuning.md), one entry per knob, keyed by its dotted path under ``prune.ballot``::

    prune.ballot.conflict_threshold: {type: float, low: 0.05, high: 5.0, log: true}
    prune.ballot.refine_train.epochs: {type: int, low: 6, high: 20, step: 2}
    prune.ballot.refine_train.schedule: {type: categorical, choices: [cosine, step, plateau]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ballot.errors import ConfigError

TUNABLE = "prune.ballot."
KINDS = {"float": {"low", "high", "log"}, "int": {"low", "high", "step", "log"}, "categorical": {"choices"}}
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Knob:
    """One searched parameter: its dotted config key and its distribution."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: int = 1
    choices: tuple[Scalar, ...] = ()

    def suggest(self, trial: Any) -> Scalar:
        """Sample this knob's value from an Optuna trial (the param is named by ``key``)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=self.step, log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a point of this knob's distribution."""
        if self.kind == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        return self.kind == "float" or (isinstance(value, int) and (value - int(self.low)) % self.step == 0)

    def edges(self) -> list[Scalar]:
        """The extreme values (every choice of a categorical knob): enough to validate the knob once."""
        if self.kind == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]


def shown(value: Any) -> str:
    """``repr(value)``, but an integer too long to read (or to print at all) as its length."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return repr(value)


def to_float(value: Any, where: str) -> float:
    """``value`` as a float: a number, or a string YAML leaves unparsed ("1e-4", ".inf"); ConfigError naming
    ``where`` for anything else or for an integer beyond the float range."""
    if isinstance(value, str):
        try:
            value = float(value.replace(".inf", "inf"))
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {shown(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(f"{where}: {shown(value)} is too large for a number") from None


def parse_space(space: Any, where: str = "tune.space") -> list[Knob]:
    """Knobs from a ``tune.space`` mapping; ConfigError names the entry and what is wrong with it."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"{where}: expected a non-empty mapping of knob -> spec (see docs/tuning.md), got {space!r}")
    return [_parse_knob(str(key), spec, f"{where}.{key}") for key, spec in space.items()]


def _parse_knob(key: str, spec: Any, where: str) -> Knob:
    if not key.startswith(TUNABLE):
        raise ConfigError(f"{where}: a knob is named by its whole dotted path under {TUNABLE} (e.g. "
                          f"{TUNABLE}conflict_threshold; on the command line set the whole space: "
                          "--set 'tune.space={...}'). Only Ballot's knobs can be tuned: every trial re-uses one "
                          "dense model, so dense-phase settings such as train_dense.rewind_iter cannot vary per trial")
    if not isinstance(spec, Mapping) or spec.get("type") not in KINDS:
        raise ConfigError(f"{where}: expected a mapping with type: one of {sorted(KINDS)}, got {spec!r}")
    kind = spec["type"]
    extra = sorted(set(spec) - KINDS[kind] - {"type"})
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {extra} for type {kind}; allowed: {sorted(KINDS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        ok = isinstance(choices, list) and choices and all(isinstance(c, Scalar) for c in choices)
        if not ok:
            raise ConfigError(f"{where}.choices: expected a non-empty list of plain values, got {choices!r}")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}.choices: duplicate values in {choices!r}")
        return Knob(key, kind, choices=tuple(choices))
    bounds = {}
    for name in ("low", "high"):
        value = spec.get(name)
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}.{name}: expected a finite integer, got {shown(value)}")
        number = to_float(value, f"{where}.{name}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}.{name}: expected a finite number, got {value!r}")
        bounds[name] = value if kind == "int" else number
    log, step = spec.get("log", False), spec.get("step", 1)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true/false, got {log!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ConfigError(f"{where}.step: expected a positive integer, got {step!r}")
    if not bounds["low"] < bounds["high"]:
        raise ConfigError(f"{where}: low ({bounds['low']}) must be below high ({bounds['high']})")
    if log and bounds["low"] <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {bounds['low']}")
    if log and step != 1:
        raise ConfigError(f"{where}: step and log cannot be combined")
    return Knob(key, kind, low=float(bounds["low"]), high=float(bounds["high"]), log=log, step=step)
