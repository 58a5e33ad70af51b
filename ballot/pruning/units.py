"""Units for structured pruning: neurons of linear layers and output channels of convolutions, coupled by DepGraph.

Torch-Pruning's dependency graph (Fang et al. 2023, DepGraph) groups the parameter slices that must go together
when one unit goes: the producing layer's output rows and bias, a following BatchNorm's scale and shift, every
consumer's input columns (through flatten and pooling), and, across a residual add, every layer feeding or reading
the same channels. A *unit group* is one such group; removing unit ``i`` of a group zeroes all of its slices, so the
unit's output is exactly zero and the export can cut it out of the graph. The classifier (the last prunable layer
a forward pass calls, ``classifier_layer``) keeps all its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ballot.depgraph import dependency_graph
from ballot.errors import MaskError
from ballot.masks import PRUNABLE_TYPES, RECURRENT_TYPES, Mask, classifier_layer, first_owner_names, prunable_names


@dataclass(frozen=True)
class UnitSlice:
    """Positions ``index`` along ``dim`` of parameter ``param`` that belong to the units ``unit`` (same length)."""

    param: str
    dim: int
    index: torch.Tensor
    unit: torch.Tensor


@dataclass(frozen=True)
class UnitGroup:
    """Coupled units, named after the first producing layer's weight; ``slices`` cover every member parameter."""

    name: str
    size: int
    slices: tuple[UnitSlice, ...]

    def producers(self, weights: set[str]) -> list[UnitSlice]:
        """The output-row slices of prunable weights: what a unit's L1 norm sums (Li et al. 2017, filter pruning)."""
        return [s for s in self.slices if s.dim == 0 and s.param in weights]


def check_unit_prunable(model: nn.Module) -> None:
    """MaskError naming the first layer whose units a per-dimension slice cannot describe: a grouped convolution
    other than a plain depthwise one (groups = input = output channels), whose input channels are columns of one
    group's rows only, an attention layer, whose embedding dimension runs through the q, k and v thirds of one
    weight, a recurrent layer or cell, whose hidden units run through its gates' quarters (LSTM) or thirds (GRU), and
    a weight two layers share."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not (
                module.groups == module.in_channels == module.out_channels):
            raise MaskError(f"prune.granularity 'unit' cannot prune the grouped convolution '{name}' (groups="
                            f"{module.groups}, {module.in_channels} -> {module.out_channels} channels); use "
                            "prune.granularity=weight")
        if isinstance(module, nn.MultiheadAttention):
            raise MaskError(f"prune.granularity 'unit' cannot remove units through the attention layer '{name}'; "
                            "use prune.granularity=weight")
        if isinstance(module, RECURRENT_TYPES):
            raise MaskError(f"prune.granularity 'unit' cannot remove units through the recurrent layer '{name}' "
                            f"({type(module).__name__}); use prune.granularity=weight")
    first_name = first_owner_names(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        if first_name[id(param)] != name:
            raise MaskError(f"prune.granularity 'unit' cannot prune '{name}', the same tensor as "
                            f"'{first_name[id(param)]}' (tied): its units would belong to two groups; use "
                            "prune.granularity=weight")


def unit_groups(model: nn.Module, input_shape: Sequence[int]) -> list[UnitGroup]:
    """The model's unit groups, from a DepGraph trace on a two-sample input of ``input_shape``."""
    model = model.cpu().eval()
    check_unit_prunable(model)
    classifier = classifier_layer(model, input_shape)
    graph = dependency_graph(model, input_shape)
    names = {module: name for name, module in model.named_modules()}
    groups = []
    for group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=list(PRUNABLE_TYPES)):
        slices, size = [], len(group[0].idxs)
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler.__name__
            if module not in names:
                continue  # DepGraph's stand-ins for functional ops (add, relu, flatten) hold no parameters
            prefix = f"{names[module]}." if names[module] else ""
            index, unit = torch.tensor(item.idxs, dtype=torch.long), torch.tensor(item.root_idxs, dtype=torch.long)
            for param_name, param in module.named_parameters(recurse=False):
                if handler == "prune_out_channels":
                    slices.append(UnitSlice(prefix + param_name, 0, index, unit))
                elif handler == "prune_in_channels" and param.dim() > 1:
                    slices.append(UnitSlice(prefix + param_name, 1, index, unit))
        groups.append(UnitGroup(slices[0].param if slices else f"group{len(groups)}", size, tuple(slices)))
    if not groups:
        raise MaskError("the model has no prunable units (only its classifier is prunable)")
    return groups


def unit_scores(model: nn.Module, groups: Sequence[UnitGroup]) -> dict[str, torch.Tensor]:
    """Each unit's L1 norm: the sum of |w| over its output rows in every coupled producing layer."""
    params, weights = dict(model.named_parameters()), set(prunable_names(model))
    scores = {}
    for group in groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        for s in group.producers(weights):
            rows = params[s.param].detach().cpu().index_select(0, s.index).abs().flatten(1).sum(1)
            total.index_add_(0, s.unit, rows.double())
        scores[group.name] = total
    return scores


def unit_mask(model: nn.Module, groups: Sequence[UnitGroup], keep: Mapping[str, torch.Tensor]) -> Mask:
    """The Mask that removes every unit not in ``keep`` ({group name: bool per unit}): its weight slices are
    pruned, its other parameters (biases, BatchNorm scale and shift) pinned at zero."""
    params, weights = dict(model.named_parameters()), prunable_names(model)
    entries = {n: torch.ones_like(params[n], dtype=torch.bool, device="cpu") for n in weights}
    pinned: dict[str, torch.Tensor] = {}
    for group in groups:
        kept = keep[group.name]
        if kept.shape != (group.size,):
            raise MaskError(f"unit group '{group.name}' has {group.size} units, the selection {tuple(kept.shape)}")
        for s in group.slices:
            if s.param in entries:
                target = entries[s.param]
            else:
                target = pinned.setdefault(s.param, torch.ones_like(params[s.param], dtype=torch.bool, device="cpu"))
            target.index_fill_(s.dim, s.index[~kept[s.unit]], False)
    return Mask(entries, pinned)


def unit_counts(model: nn.Module, groups: Sequence[UnitGroup], density: float) -> dict[str, int]:
    """Per-group kept units for one keep ratio shared by every group (at least one unit each), the ratio chosen so
    that the resulting weight density is as close to ``density`` as whole units allow."""

    def counts(ratio: float) -> dict[str, int]:
        return {g.name: min(g.size, max(1, round(ratio * g.size))) for g in groups}

    def density_of(ratio: float) -> float:
        keep = {g.name: torch.arange(g.size) < k for g, k in zip(groups, counts(ratio).values())}
        return unit_mask(model, groups, keep).density()

    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if density_of(middle) < density else (low, middle)
    best = min((low, high), key=lambda r: (abs(density_of(r) - density), r))
    return counts(best)


def select_units(scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Each group's ``counts[name]`` best-scoring units (ties: the earlier unit)."""
    chosen = {}
    for name, score in scores.items():
        if not torch.isfinite(score).all():
            raise MaskError("unit scores must be finite")
        order = torch.argsort(score, descending=True, stable=True)
        chosen[name] = torch.zeros(score.numel(), dtype=torch.bool)
        chosen[name][order[:counts[name]]] = True
    return chosen


def kept_units(mask: Mask, groups: Sequence[UnitGroup]) -> dict[str, int]:
    """Units left in each group by ``mask`` (a unit is gone when its first producer's rows are all pruned)."""
    kept = {}
    for group in groups:
        rows = next(s for s in group.slices if s.dim == 0 and s.param in mask)
        alive = mask[rows.param].index_select(0, rows.index).flatten(1).any(1)
        kept[group.name] = int(torch.zeros(group.size, dtype=torch.bool).index_put_((rows.unit,), alive).sum())
    return kept
