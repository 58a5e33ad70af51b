"""A random mask at the same density: the sanity floor."""

from __future__ import annotations

import torch

from ballot.masks import Mask, prunable_names
from ballot.models import build_model
from ballot.pruning.base import PruneContext, PruneResult


def prune(ctx: PruneContext) -> PruneResult:
    """Keep uniformly random weights (seeded) network-wide, rewind and retrain (ctx.train_rewound)."""
    template = build_model(ctx.model_name, ctx.data.input_shape, ctx.data.num_classes)  # names and shapes only
    params = dict(template.named_parameters())
    generator = torch.Generator().manual_seed(ctx.seed)
    scores = {n: torch.rand(params[n].shape, generator=generator) for n in prunable_names(template)}
    mask = Mask.top_k(scores, ctx.density, ctx.config.min_per_layer)
    model, result = ctx.train_rewound(mask, "random retrain")
    return PruneResult(mask, model, history=result.history, final_choice=result.final_choice)
