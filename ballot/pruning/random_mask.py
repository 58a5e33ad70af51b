"""A random mask at the same density: the sanity floor."""

from __future__ import annotations

import torch

from ballot.masks import Mask, prunable_names
from ballot.pruning.base import PruneContext, PruneResult


def prune(ctx: PruneContext) -> PruneResult:
    """Keep uniformly random weights (seeded) network-wide, rewind and retrain (ctx.train_rewound)."""
    shapes = ctx.model_from(ctx.dense.rewind_state)
    params = dict(shapes.named_parameters())
    generator = torch.Generator().manual_seed(ctx.seed)
    scores = {n: torch.rand(params[n].shape, generator=generator) for n in prunable_names(shapes)}
    mask = Mask.top_k(scores, ctx.density, ctx.config.min_per_layer)
    model, result = ctx.train_rewound(mask, "random retrain")
    return PruneResult(mask, model, history=result.history, final_choice=result.final_choice)
