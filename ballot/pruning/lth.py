"""Lottery-ticket pruning: iterative magnitude pruning with weight rewinding (Frankle et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ballot.masks import Mask, density_schedule, magnitude_scores
from ballot.pruning.base import MethodDetails, PruneContext, PruneResult
from ballot.train import train


@dataclass
class LthRound:
    density: float
    kept: int
    history: list[dict[str, Any]]  # per epoch of the round's training


@dataclass
class LthDetails(MethodDetails):
    rounds: list[LthRound]


def prune(ctx: PruneContext) -> PruneResult:
    """n rounds: prune the smallest surviving weights, rewind survivors to theta_k, retrain (the last round:
    ctx.train_rewound, whose start prune.ballot.refine_start may move).

    Round r keeps density ** (r / n) of all prunable weights, chosen among the previous round's
    survivors, so masks are nested. The first round prunes the dense phase's theta_T. The last round's
    training is the shared final training (plain, or refined with prune.final_train).
    """
    trained = ctx.model_from(ctx.dense.trained_state)
    mask = Mask.ones_like(trained)
    rounds: list[LthRound] = []
    masks = []
    schedule = density_schedule(ctx.density, ctx.config.lth_rounds)
    for number, round_density in enumerate(schedule, start=1):
        scores = magnitude_scores(trained)
        survivors_only = {n: s.masked_fill(~mask[n], -1.0) for n, s in scores.items()}  # |w| >= 0 > -1
        mask = ctx.agree(Mask.top_k(survivors_only, round_density, ctx.config.min_per_layer), f"LTH round {number}")
        desc = f"lth round {number}"
        if number == len(schedule):
            trained, result = ctx.train_rewound(mask, desc)
        else:
            trained = ctx.model_from(ctx.dense.rewind_state)
            result = train(trained, ctx.data.train, ctx.config.retrain, seed=ctx.seed, mask=mask, device=ctx.device,
                           desc=desc, progress=ctx.progress)
        rounds.append(LthRound(mask.density(), mask.kept, result.history))
        masks.append(mask)
    return PruneResult(mask, trained, LthDetails(rounds), history=result.history, round_masks=masks,
                       final_choice=result.final_choice)
