"""The benchmarks' named methods: each is a valid configuration that trains the way its name says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ballot.config import apply_overrides, experiment_from_params

_SPEC = importlib.util.spec_from_file_location("variants", Path(__file__).parents[1] / "benchmarks" / "variants.py")
variants = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(variants)


@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_every_variant_is_a_valid_configuration_named_after_what_it_runs(name: str) -> None:
    prune = experiment_from_params(apply_overrides({}, variants.VARIANTS[name])).prune
    assert name.startswith(prune.method)
    assert prune.granularity == ("unit" if "(unit)" in name else "weight")
    refined = "+ refined" in name or (prune.method == "ballot" and "plain retraining" not in name)
    assert prune.refined() == refined


def test_every_baseline_is_a_variant_and_not_ballot() -> None:
    assert set(variants.BASELINES) <= set(variants.VARIANTS)
    for name in variants.BASELINES:  # the method the whole override list configures, not just its first entry
        assert experiment_from_params(apply_overrides({}, variants.VARIANTS[name])).prune.method != "ballot", name
