"""One-shot global magnitude pruning of the trained dense model, then fine-tuning of the survivors."""

from __future__ import annotations

from ballot.masks import Mask, magnitude_scores
from ballot.pruning.base import PruneContext, PruneResult


def prune(ctx: PruneContext) -> PruneResult:
    """Drop the smallest |w| of theta_T network-wide to the density, fine-tune without rewinding."""
    model = ctx.model_from(ctx.dense.trained_state)
    mask = Mask.top_k(magnitude_scores(model), ctx.density, ctx.config.min_per_layer)
    result = ctx.final_train(model, mask, "magnitude fine-tune")
    return PruneResult(mask, model, history=result.history)
