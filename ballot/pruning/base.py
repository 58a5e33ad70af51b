"""What every pruner receives and returns, and the final training every pruner shares."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch
from torch import nn

from ballot import distributed
from ballot.config import PruneConfig
from ballot.data import DataBundle
from ballot.fairness import evaluate, fairness_class_weights, fairness_objective
from ballot.masks import Mask
from ballot.models import build_model
from ballot.pruning.units import UnitGroup, unit_groups
from ballot.train import TrainResult, recalibrate_batchnorm, train


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
    # Called after each epoch of the final training with (epoch, validation metrics), epochs numbered across competing
    # final trainings; it may raise to stop the run early (Optuna's TrialPruned).
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None

    def model_from(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A fresh model of the configured architecture loaded with ``state``."""
        model = build_model(self.model_name, self.data.input_shape, self.data.num_classes)
        model.load_state_dict(state)
        return model.to(self.device)

    def val_metrics(self, model: nn.Module) -> dict[str, Any]:
        """Class metrics of ``model`` on the validation split."""
        val = self.data.val
        return evaluate(model, val.x, val.y, self.data.num_classes, device=self.device)

    @cached_property
    def unit_groups(self) -> list[UnitGroup]:
        """The architecture's coupled units (prune.granularity 'unit')."""
        return unit_groups(build_model(self.model_name, self.data.input_shape, self.data.num_classes),
                           self.data.input_shape)

    @cached_property
    def dense_class_weights(self) -> torch.Tensor:
        """Fairness class weights w_c = 1 / max(acc_c, delta) (mean 1) from theta_T's validation accuracy, shrunk
        toward the balanced accuracy by prune.ballot.class_weight_prior_images.

        Taken from the dense model, not from the method's own models, so every method's refined training and
        Ballot's fairness gradient weigh the classes alike."""
        per_class = self.val_metrics(self.model_from(self.dense.trained_state))["per_class"]
        counts = torch.bincount(self.data.val.y.long(), minlength=self.data.num_classes).tolist()
        ballot = self.config.ballot
        weights = fairness_class_weights(per_class, counts, ballot.class_weight_floor, ballot.class_weight_prior_images)
        return distributed.broadcast(weights.to(self.device)).cpu()  # one validation pass decides, rank 0's

    def train_rewound(self, mask: Mask, desc: str) -> tuple[nn.Module, TrainResult]:
        """The final model and training of a rewinding method (LTH, random, Ballot; SafeCompress, FairScratch when
        refined): ``mask`` trained by final_train from theta_k, or, when the final training is refined, as
        prune.ballot.refine_start says: from theta_T's survivors with 'trained' (learning-rate rewinding; the refine
        guard's plain training then starts there too), from both with 'best' (the refined training from theta_T
        competes with the one from theta_k)."""
        if not self.config.rewinds():
            raise RuntimeError(f"'{self.config.method}' at '{self.config.granularity}' granularity is not in "
                               "REWINDING_METHODS (ballot.config) but trains from the rewound state")
        start = self.config.ballot.refine_start if self.config.refined() else "rewind"
        model = self.model_from(self.dense.trained_state if start == "trained" else self.dense.rewind_state)
        return model, self.final_train(model, mask, desc, self.dense.trained_state if start == "best" else None)

    def recalibrate(self, model: nn.Module) -> None:
        """With prune.recalibrate_bn, re-estimate ``model``'s BatchNorm statistics on the training split (as it ships;
        idempotent: the statistics are plain averages over the same batches)."""
        if self.config.recalibrate_bn:
            recalibrate_batchnorm(model, self.data.train.x, self.config.retrain.batch_size)

    def agree(self, mask: Mask, what: str = "the mask") -> Mask:
        """``mask``, after checking that every process selected the same one (DistributedError if not)."""
        distributed.check_identical({name: mask[name] for name in mask}, what)
        return mask

    def final_train(self, model: nn.Module, mask: Mask, desc: str,
                    theta_t_rival: dict[str, torch.Tensor] | None = None) -> TrainResult:
        """Train the final mask in place: plain (prune.retrain, cross-entropy) or refined (prune.ballot.refine_train
        with the fairness-weighted loss), as prune.final_train says.

        A refined training may have rivals, each trained on the same mask with the same seed: ``theta_t_rival``
        (train_rewound with prune.ballot.refine_start 'best') adds the refined training from that state's survivors,
        prune.ballot.refine_guard a plain training from ``model``'s start. ``model`` then ends as the candidate with
        the higher validation objective (ties: the earlier one: refined, named 'refined from theta_k' when theta_T's
        survivors compete, then refined from theta_T, then plain), each scored as
        it ships (BatchNorm recalibrated), and the result's ``final_choice`` records the pick and every objective.
        ``on_epoch`` sees each epoch's validation metrics, numbered across the trainings."""
        epochs_done = 0

        def val_objective(m: nn.Module) -> float:
            nonlocal epochs_done
            epochs_done += 1
            metrics = self.val_metrics(m)
            if self.on_epoch is not None:
                self.on_epoch(epochs_done, metrics)
            return self._objective(metrics)

        guard = self.config.ballot.refine_guard
        if not self.config.refined() or (theta_t_rival is None and not guard):
            return self._train_final(model, mask, desc, self.config.refined(), val_objective)
        start = copy.deepcopy(model.state_dict())
        first = "refined" if theta_t_rival is None else "refined from theta_k"
        candidates = {first: (start, True)}  # {label: (start state, refined?)}, in tie-breaking order
        if theta_t_rival is not None:
            candidates["refined from theta_T"] = (theta_t_rival, True)
        if guard:
            candidates["plain"] = (start, False)
        objectives: dict[str, float] = {}
        seconds, kept, kept_state, best = 0.0, None, None, float("-inf")
        for label, (initial, refined) in candidates.items():
            model.load_state_dict(initial)
            suffix = "" if label == first else f" ({label})"
            result = self._train_final(model, mask, desc + suffix, refined, val_objective)
            self.recalibrate(model)
            score = torch.tensor([self._objective(self.val_metrics(model))], dtype=torch.float64)
            objectives[label] = float(distributed.broadcast(score.to(self.device)).cpu())  # rank 0's score decides
            seconds += result.seconds
            if kept is None or objectives[label] > best:  # ties: the earlier
                kept, kept_state, best = result, copy.deepcopy(model.state_dict()), objectives[label]
                kept.final_choice = {"kept": label}
        model.load_state_dict(kept_state)
        kept.final_choice["objectives"] = objectives
        kept.seconds = seconds
        return kept

    def _objective(self, val_metrics: dict[str, Any]) -> float:
        """The validation objective the plateau schedule watches and rival final trainings are compared on: val acc -
        mcd_weight x MCD."""
        return fairness_objective(val_metrics, self.config.ballot.objective_mcd_weight)

    def _train_final(self, model: nn.Module, mask: Mask, desc: str, refined: bool,
                     val_objective: Callable[[nn.Module], float]) -> TrainResult:
        """One final training of ``mask``: refined (weighted loss, refine_train) or plain (retrain, cross-entropy)."""
        ballot = self.config.ballot
        if refined:
            cfg, mix, weights_from = ballot.refine_train, ballot.fairness_loss_weight, ballot.fairness_start
            weights = None if mix == 0 else (1 - mix) + mix * self.dense_class_weights
        else:
            cfg, weights, weights_from = self.config.retrain, None, 0.0
        watch = cfg.schedule == "plateau" or self.on_epoch is not None
        return train(model, self.data.train, cfg, seed=self.seed, mask=mask, device=self.device, class_weights=weights,
                     class_weights_from=weights_from, desc=desc, progress=self.progress,
                     epoch_metric=val_objective if watch else None)


@dataclass
class MethodDetails:
    """What a method reports besides its mask and model (details.json); each method with more to say subclasses it
    with typed fields, JSON-ready values only."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PruneResult:
    """A mask, the trained sparse model it belongs to, its training history, and method-specific details."""

    mask: Mask
    model: nn.Module
    details: MethodDetails = field(default_factory=MethodDetails)
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch records of the training that made model
    # extra tensor files {file stem: {name: tensor}} (Ballot: votes.safetensors)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    round_masks: list[Mask] = field(default_factory=list)  # intermediate masks of iterative methods
    final_choice: dict[str, Any] | None = None  # TrainResult.final_choice: the final training kept among rivals
