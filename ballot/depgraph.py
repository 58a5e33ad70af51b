"""Torch-Pruning's dependency graph of a model (which layers, norms and reshapes every unit couples), traced in one
place with one clear error when Torch-Pruning cannot follow the model."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ballot.errors import UntraceableModelError


def dependency_graph(model: nn.Module, input_shape: Sequence[int]) -> Any:
    """``model``'s DependencyGraph, traced through autograd on two zero inputs of ``input_shape`` (the caller sets
    requires_grad: a frozen parameter leaves its layer out). UntraceableModelError when Torch-Pruning fails on it
    (it divides by zero on the channel shuffle of ShuffleNetV2, for one)."""
    import torch_pruning as tp

    try:
        with torch.enable_grad():
            # verbose off: it warns that a parameter outside any layer (a class token, learned positions) is cut
            # along its last dimension, the channel one, which is what removal needs (and parity checks)
            return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(2, *input_shape),
                                                         verbose=False)
    except Exception as error:  # noqa: BLE001  any failure inside the third-party tracer means the same to us
        raise UntraceableModelError(f"Torch-Pruning cannot trace the model's unit dependencies ({type(error).__name__}"
                                    f": {error}), which unit pruning needs; prune.granularity=weight does "
                                    f"not") from error
