"""What every pruner receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ballot.config import PruneConfig
from ballot.data import DataBundle
from ballot.masks import Mask
from ballot.models import build_model


@dataclass
class DenseArtifacts:
    """The dense phase: initial weights theta_0, rewind state theta_k and trained weights theta_T."""

    init_state: dict[str, torch.Tensor]
    rewind_state: dict[str, torch.Tensor]
    trained_state: dict[str, torch.Tensor]


@dataclass
class PruneContext:
    """Everything a pruner needs: data, model recipe, the dense phase's states and the budget."""

    data: DataBundle
    model_name: str
    density: float
    seed: int
    dense: DenseArtifacts
    config: PruneConfig
    device: torch.device = torch.device("cpu")
    progress: bool | None = None
    # Called after each epoch of the final (re)training with (epoch, validation metrics); it may raise to stop
    # the run early (Optuna's TrialPruned). Methods that support it: ballot.
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None

    def model_from(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A fresh model of the configured architecture loaded with ``state``."""
        model = build_model(self.model_name, self.data.input_shape, self.data.num_classes)
        model.load_state_dict(state)
        return model.to(self.device)


@dataclass
class PruneResult:
    """A mask, the trained sparse model it belongs to, and method-specific details for reports."""

    mask: Mask
    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    round_masks: list[Mask] = field(default_factory=list)  # intermediate masks of iterative methods
