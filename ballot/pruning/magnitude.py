"""One-shot magnitude pruning of the trained dense model, then fine-tuning of the survivors: global |w|
(unstructured), or each layer's units of smallest L1 norm (prune.granularity 'unit': L1-norm filter pruning,
Li et al. 2017, over DepGraph's coupled groups)."""

from __future__ import annotations

from dataclasses import dataclass

from ballot.masks import Mask, magnitude_scores
from ballot.pruning.base import MethodDetails, PruneContext, PruneResult
from ballot.pruning.units import select_units, unit_counts, unit_mask, unit_scores


@dataclass
class MagnitudeDetails(MethodDetails):
    units_kept: dict[str, int] | None = None  # unit granularity: units kept per group


def prune(ctx: PruneContext) -> PruneResult:
    """Drop the smallest weights (or units) of theta_T to the density, fine-tune without rewinding."""
    model = ctx.model_from(ctx.dense.trained_state)
    details = MagnitudeDetails()
    if ctx.config.granularity == "unit":
        groups = ctx.unit_groups
        keep = select_units(unit_scores(model, groups), unit_counts(model, groups, ctx.density))
        mask = unit_mask(model, groups, keep)
        details.units_kept = {name: int(k.sum()) for name, k in keep.items()}
    else:
        mask = Mask.top_k(magnitude_scores(model), ctx.density, ctx.config.min_per_layer)
    result = ctx.final_train(model, mask, "magnitude fine-tune")
    return PruneResult(mask, model, details, history=result.history, final_choice=result.final_choice)
