"""One trial: sample the knobs, prune with Ballot on the study's shared dense model, score on validation.

Single mode maximises ``val acc - mcd_weight * val MCD``. Both terms are fractions of the same per-class
validation accuracies acc_c (acc is their sample-weighted mean, MCD = max_c acc_c - min_c acc_c), so they share one
scale: a weight of 0.5 trades one point of accuracy for two points of gap between the best and the worst class.
CWV, a squared quantity (about 0.01 here), would need a weight near 100 to register, which is why MCD is used.
Multi mode returns (val acc, val CWV), maximised and minimised.

Feasibility: a trial is feasible when val acc >= dense val acc - max_acc_drop. The margin is stored as the
Optuna constraint ``acc_drop`` (<= 0 feasible): TPE learns from it, and ``Study.best_trial`` / ``best_trials`` only
ever return feasible trials. The raw objective is kept, so the history shows what each trial really scored.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ballot.config import ExperimentConfig
from ballot.data import DataBundle
from ballot.experiment import run_prune
from ballot.fairness import evaluate, fairness_objective
from ballot.knobs import Knob
from ballot.models import build_model
from ballot.pruning import DenseArtifacts
from ballot.train import resolve_device, stretched
from ballot.tuning.kept import keep_trial
from ballot.tuning.space import with_values

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
CONSTRAINT = "acc_drop"
BASELINE = "baseline"  # user attribute of the trials queued with Ballot's configured values
HELD = (*COUNTED, TrialState.WAITING)  # a baseline trial in these states ran, runs or will run
RAISED = "raised"  # user attribute of a trial whose run failed with an error of its own (a killed one has none)
SURPLUS = "surplus"  # user attribute of a trial that stepped back without running: the budget was already taken


class SurplusTrial(Exception):
    """The study already holds or runs its requested number of trials; this extra one is dropped (state FAIL)."""


@dataclass
class TrialContext:
    """What every trial of one worker shares."""

    cfg: ExperimentConfig  # the trial base: Ballot, with tune.* settings
    data: DataBundle
    dense: DenseArtifacts
    knobs: list[Knob]
    dense_val_acc: float
    keep_dir: Path | None = None  # each completed trial's model is kept here (ballot.tuning.kept)


THIN_CLASS_IMAGES = 10  # fewer validation images than this in a class, and one image moves the objective visibly


def thin_validation_warning(val_labels: torch.Tensor, class_names: Sequence[str]) -> str | None:
    """A one-line warning when a class present in the validation split has fewer than THIN_CLASS_IMAGES images:
    one image then moves that class's accuracy by 1/n, and the objective's fairness term (MCD or CWV) with it."""
    counts = torch.bincount(val_labels.long(), minlength=len(class_names))
    present = torch.nonzero(counts).flatten()
    thinnest = int(present[torch.argmin(counts[present])]) if len(present) else None
    if thinnest is None or int(counts[thinnest]) >= THIN_CLASS_IMAGES:
        return None
    n = int(counts[thinnest])
    return (f"warning: the validation split holds {n} image(s) of class '{class_names[thinnest]}', so one image moves "
            f"its accuracy by {1 / n:.2f} and the study's fairness term with it: the study may fit noise (on held-out "
            f"long-tailed data such studies lost test accuracy, reports/heldout_checks/); prefer a larger "
            f"data.val_fraction, a lower tune.mcd_weight, or Ballot's defaults")


def dense_val_accuracy(cfg: ExperimentConfig, data: DataBundle, dense: DenseArtifacts) -> float:
    """Validation accuracy of the dense model theta_T: the reference of the feasibility rule."""
    device = resolve_device(cfg.base.device)
    model = build_model(cfg.base.model, data.input_shape, data.num_classes)
    model.load_state_dict(dense.trained_state)
    return float(evaluate(model, data.val.x, data.val.y, data.num_classes, device=device)["acc"])


def baseline_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's baseline trials that ran, run or wait to run, or failed with an error of their own (running the
    same values again would fail again); one failed without an error, killed, is lost."""
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(BASELINE)
            and (t.state in HELD or RAISED in t.user_attrs)]


def claim_slot(trial: optuna.Trial, n_trials: int) -> None:
    """Raise SurplusTrial when ``n_trials`` earlier trials are already finished or running, or when the trial is a
    baseline and an earlier baseline trial ran, runs or waits.

    Workers check the budget (and queue the baseline) before asking for a trial, but two of them can do so at the
    same moment; trial numbers are unique and ordered, so the later one sees the earlier one here and steps back.
    """
    earlier = [t for t in trial.study.get_trials(deepcopy=False, states=COUNTED) if t.number < trial.number]
    if len(earlier) >= n_trials:
        trial.set_user_attr(SURPLUS, True)
        raise SurplusTrial(f"trial {trial.number}: the study already has {n_trials} trials finished or running")
    if trial.user_attrs.get(BASELINE) and any(t.number < trial.number for t in baseline_trials(trial.study)):
        trial.set_user_attr(SURPLUS, True)
        raise SurplusTrial(f"trial {trial.number}: an earlier trial already runs Ballot's configured values")


def _record(trial: optuna.Trial, metrics: dict[str, Any], mcd_weight: float) -> float:
    value = fairness_objective(metrics, mcd_weight)
    for name in ("acc", "cwv", "mcd", "worst_class"):
        trial.set_user_attr(f"val_{name}", float(metrics[name]))
    trial.set_user_attr("objective", value)
    return value


def run_trial(trial: optuna.Trial, ctx: TrialContext) -> float | tuple[float, float]:
    """The Optuna objective: one Ballot run with the trial's knobs, reported per epoch of its first final training.

    Where final trainings compete (refine_start 'best', refine_guard) the later ones start elsewhere and, when the
    refined epochs are searched, at different steps in different trials, so the pruner sees the first one only."""
    claim_slot(trial, ctx.cfg.tune.n_trials)
    try:
        return _run_trial(trial, ctx)
    except optuna.TrialPruned:
        raise
    except Exception as error:
        trial.set_user_attr(RAISED, f"{type(error).__name__}: {error}"[:500])
        raise


def _run_trial(trial: optuna.Trial, ctx: TrialContext) -> float | tuple[float, float]:
    tune = ctx.cfg.tune
    values = {knob.key: knob.suggest(trial) for knob in ctx.knobs}
    cfg = with_values(ctx.cfg, values)
    knobs, samples = cfg.prune.ballot, len(ctx.data.train)
    observed = (knobs.rounds - 1) * stretched(cfg.prune.observation(), samples).epochs
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    finals = [stretched(schedule, samples).epochs for schedule in cfg.prune.final_schedules()]  # in training order
    trial.set_user_attr("epochs_planned", observed + sum(finals))
    trial.set_user_attr("epochs_run", observed)
    single = tune.mode == "single"

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        trial.set_user_attr("epochs_run", observed + epoch)
        if single and epoch <= finals[0]:
            trial.report(fairness_objective(metrics, tune.mcd_weight), epoch)
            if trial.should_prune():
                _record(trial, metrics, tune.mcd_weight)
                raise optuna.TrialPruned(f"pruned after {epoch} final-training epochs")

    start = time.perf_counter()
    result = run_prune(cfg, ctx.data, ctx.dense, progress=False, on_epoch=on_epoch)
    seconds = time.perf_counter() - start
    val = ctx.data.val
    metrics = evaluate(result.model, val.x, val.y, ctx.data.num_classes, device=resolve_device(cfg.base.device))
    if ctx.keep_dir is not None:
        keep_trial(ctx.keep_dir, trial.number, result, cfg, ctx.dense, values, metrics, seconds)
    value = _record(trial, metrics, tune.mcd_weight)
    floor = ctx.dense_val_acc - tune.max_acc_drop
    trial.set_constraint(CONSTRAINT, floor - float(metrics["acc"]))
    trial.set_user_attr("feasible", bool(metrics["acc"] >= floor))
    return value if single else (float(metrics["acc"]), float(metrics["cwv"]))
