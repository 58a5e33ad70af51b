"""The noise guard: the study's best trial replaces Ballot's configured values only when it beats them beyond the
noise of the validation split.

A study reports the highest of many validation scores, and on a small or long-tailed validation split the highest
is often luck: with two images of the rarest class, one image moves MCD by 0.5 (reports/heldout_checks/). So every
completed trial records which validation samples it got right (packed bits, user attribute ``val_correct``), and
at the end the best trial (the *challenger*) is compared with the baseline trial (trial 0, the configured values)
on ``RESAMPLES`` paired, class-stratified bootstrap resamples of the validation split: each class's samples are drawn
with replacement, as many as it has, and both trials are scored on the same draw with the study's objective. The
challenger is chosen when it scores strictly higher in at least ``tune.min_win_confidence`` of the resamples;
otherwise the baseline is. The resampling is seeded, so the same trials always give the same decision.

The challenger was picked as the best of many, which this comparison does not correct for, so the guard is
lenient: it stops picks that one or two images decide, not every lucky one.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ballot.fairness import fairness_objective

RESAMPLES = 2000
CORRECT_ATTR = "val_correct"
_CHUNK = 200  # resamples scored at once: memory is _CHUNK x validation size


def pack_correct(correct: torch.Tensor) -> str:
    """A boolean vector as base64 text of its packed bits (one byte per eight samples)."""
    bits = np.packbits(correct.detach().cpu().numpy().astype(bool))
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_correct(text: str, length: int) -> torch.Tensor:
    """The boolean vector of ``length`` samples that ``pack_correct`` wrote; ValueError when the text is shorter."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8))
    if len(bits) < length:
        raise ValueError(f"the packed record holds {len(bits)} samples, fewer than the {length} expected")
    return torch.from_numpy(bits[:length].astype(bool))


def win_probability(baseline: torch.Tensor, challenger: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    mcd_weight: float, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """The share of paired, class-stratified bootstrap resamples of (``labels``, per-sample correctness) on which
    ``challenger`` scores strictly higher than ``baseline`` by acc - mcd_weight x MCD."""
    labels = labels.detach().cpu().long().flatten()
    if not (baseline.shape == challenger.shape == labels.shape):
        raise ValueError(f"correctness records of {baseline.numel()} and {challenger.numel()} samples for "
                         f"{labels.numel()} labels")
    generator = torch.Generator().manual_seed(seed)
    classes = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    classes = [positions for positions in classes if len(positions)]
    counts = torch.tensor([len(positions) for positions in classes], dtype=torch.float64)
    pair = torch.stack([baseline.cpu(), challenger.cpu()]).double()  # (2, samples)
    wins = 0
    for start in range(0, resamples, _CHUNK):
        draws = min(_CHUNK, resamples - start)
        per_class = torch.stack([pair[:, positions[torch.randint(len(positions), (draws, len(positions)),
                                                                 generator=generator)]].mean(dim=2)
                                 for positions in classes], dim=2)  # (2, draws, classes)
        metrics = {"acc": (per_class * counts).sum(dim=2) / counts.sum(),
                   "mcd": per_class.max(dim=2).values - per_class.min(dim=2).values}
        score = fairness_objective(metrics, mcd_weight)
        wins += int((score[1] > score[0]).sum())
    return wins / resamples


def guard_choice(study: optuna.Study, chosen: FrozenTrial | None, labels: torch.Tensor, num_classes: int,
                 mcd_weight: float, min_confidence: float) -> tuple[FrozenTrial | None, dict[str, Any] | None]:
    """(the trial to use, what the guard did) for a single-objective study's ``chosen`` trial.

    The baseline trial replaces ``chosen`` when it completed feasible and ``chosen`` beats it in fewer than
    ``min_confidence`` of the resamples. No record (None) when there is nothing to compare: multi-objective
    studies, no choice, the baseline chosen anyway, no feasible baseline, or ``min_confidence`` 0; a note when a
    trial lacks its per-sample record (a trial run before this guard existed).
    """
    if chosen is None or len(study.directions) > 1 or min_confidence <= 0 or chosen.user_attrs.get("baseline"):
        return chosen, None
    baseline = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.user_attrs.get("baseline") and t.user_attrs.get("feasible")), None)
    if baseline is None:
        return chosen, None
    record = {"challenger": chosen.number, "baseline": baseline.number, "min_win_confidence": min_confidence}
    if CORRECT_ATTR not in chosen.user_attrs or CORRECT_ATTR not in baseline.user_attrs:
        return chosen, {**record, "kept": "challenger", "note": "a trial has no per-sample validation record (run "
                                                                "before the guard existed); not compared"}
    n = len(labels)
    p = win_probability(unpack_correct(baseline.user_attrs[CORRECT_ATTR], n),
                        unpack_correct(chosen.user_attrs[CORRECT_ATTR], n), labels, num_classes, mcd_weight)
    kept = chosen if p >= min_confidence else baseline
    return kept, {**record, "win_probability": p, "kept": "challenger" if kept is chosen else "baseline"}


def describe_guard(guard: dict[str, Any] | None) -> str | None:
    """One line on what the guard decided, for the command line and the stage log; None when it compared nothing."""
    if not guard:
        return None
    if "win_probability" not in guard:
        return f"noise guard: trial {guard['challenger']} kept without comparison: {guard['note']}"
    share, level = f"{guard['win_probability']:.0%}", f"{guard['min_win_confidence']:.0%}"
    if guard["kept"] == "challenger":
        return (f"noise guard: trial {guard['challenger']} beats the baseline trial {guard['baseline']} on {share} of "
                f"bootstrap resamples of validation (at least {level} needed): chosen")
    return (f"noise guard: trial {guard['challenger']} scored highest but beats the baseline trial {guard['baseline']} "
            f"(the configured values) on only {share} of bootstrap resamples of validation, below "
            f"tune.min_win_confidence {guard['min_win_confidence']}: the configured values are kept")
