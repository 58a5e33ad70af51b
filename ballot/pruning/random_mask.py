"""A random mask at the same density: the sanity floor."""

from __future__ import annotations

import torch

from ballot.masks import Mask, prunable_names
from ballot.pruning.base import PruneContext, PruneResult


def prune(ctx: PruneContext) -> PruneResult:
    """Keep uniformly random weights (seeded) network-wide, rewind (ctx.rewound_model), retrain."""
    model = ctx.rewound_model()
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(ctx.seed)
    scores = {n: torch.rand(params[n].shape, generator=generator) for n in prunable_names(model)}
    mask = Mask.top_k(scores, ctx.density, ctx.config.min_per_layer)
    result = ctx.final_train(model, mask, "random retrain")
    return PruneResult(mask, model, history=result.history, guard=result.guard)
