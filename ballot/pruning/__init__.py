"""Pruner registry: method name -> prune(ctx) returning a PruneResult."""

from __future__ import annotations

from typing import Callable

from ballot.errors import UnknownMethodError
from ballot.pruning import ballot, fairscratch, lth, magnitude, random_mask, safecompress
from ballot.pruning.base import DenseArtifacts, PruneContext, PruneResult

PRUNERS: dict[str, Callable[[PruneContext], PruneResult]] = {
    "magnitude": magnitude.prune,
    "lth": lth.prune,
    "random": random_mask.prune,
    "ballot": ballot.prune,
    "safecompress": safecompress.prune,
    "fairscratch": fairscratch.prune,
}
# the methods whose every training phase goes through ballot.train, so they run data-parallel (docs/scale.md)
DATA_PARALLEL = frozenset({"magnitude", "lth", "random", "ballot"})


def get_pruner(method: str) -> Callable[[PruneContext], PruneResult]:
    """The prune function registered under ``method``."""
    if method not in PRUNERS:
        raise UnknownMethodError(f"unknown pruning method '{method}'; choose from {sorted(PRUNERS)}")
    return PRUNERS[method]


__all__ = ["PRUNERS", "DATA_PARALLEL", "get_pruner", "DenseArtifacts", "PruneContext", "PruneResult"]
