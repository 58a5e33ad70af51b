"""Dynamic sparse training mechanics as SafeCompress uses them (its code builds on ITOP / SET).

start   ``erk_random_mask``: ERK per-layer counts (exactly the budget), random positions in each layer;
        ``rescale_to_density`` optionally scales the kept weights to a dense layer's output scale.
rate    ``death_rate_at``: the share of a layer's active weights replaced, cosine-annealed over training.
update  ``drop_and_grow``: per layer, drop the smallest active |w| and regrow as many inactive positions
        (random, or largest |gradient|), so each layer keeps its count exactly.
apply   ``apply_update``: dropped and regrown weights, and their momentum buffers, are set to exactly zero.
step    ``masked_step``: an optimiser step that cannot move a pruned weight.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ballot.errors import MaskError
from ballot.masks import BoundMask, Mask, erk_counts, prunable_names


def erk_random_mask(model: nn.Module, density: float, min_per_layer: int, generator: torch.Generator) -> Mask:
    """ERK counts per prunable weight (a layer whose share exceeds 1 is dense), uniformly random positions."""
    params = dict(model.named_parameters())
    names = prunable_names(model)
    counts = erk_counts({n: tuple(params[n].shape) for n in names}, density, min_per_layer=min_per_layer)
    keep = {}
    for name in names:
        flat = torch.zeros(params[name].numel(), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=generator)[:counts[name]]] = True
        keep[name] = flat.reshape(params[name].shape)
    return Mask(keep)


@torch.no_grad()
def rescale_to_density(model: nn.Module, mask: Mask) -> None:
    """Multiply each layer's weights by 1 / sqrt(its density), so a layer keeping a share d of its inputs starts with
    the output variance it would have dense (a sparsity-aware initialisation)."""
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        params[name].mul_(1.0 / math.sqrt(float(keep.float().mean())))


def death_rate_at(step: int, total: int, start: float, end: float) -> float:
    """Cosine annealing from ``start`` at step 0 to ``end`` at step ``total``."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def drop_and_grow(weights: Mapping[str, torch.Tensor], mask: Mask, death_rate: float, growth: str,
                  generator: torch.Generator, grads: Mapping[str, torch.Tensor] | None = None) -> Mask:
    """A new mask with the same per-layer counts: each layer drops k = ceil(death_rate x active) of its smallest
    active |w| (at most as many as it has inactive positions) and regrows k positions that were inactive before
    the update: uniformly at random ('random') or those of largest |gradient| ('gradient', needs ``grads``).

    Regrowth never picks a weight dropped in the same update, so a dense layer is left as it is."""
    if growth == "gradient" and grads is None:
        raise ValueError("gradient growth needs the dense gradients of the prunable weights")
    if growth not in ("random", "gradient"):
        raise ValueError(f"unknown growth '{growth}'; choose 'random' or 'gradient'")
    new = {}
    for name, keep in mask.items():
        keep = keep.flatten()
        active, inactive = torch.nonzero(keep).flatten(), torch.nonzero(~keep).flatten()
        k = min(math.ceil(death_rate * len(active)), len(inactive))
        magnitude = weights[name].detach().flatten().abs().cpu()
        dropped = active[torch.argsort(magnitude[active], stable=True)[:k]]
        if growth == "random":
            grown = inactive[torch.randperm(len(inactive), generator=generator)[:k]]
        else:
            gradient = grads[name].detach().flatten().abs().cpu()  # type: ignore[index]
            grown = inactive[torch.argsort(gradient[inactive], descending=True, stable=True)[:k]]
        updated = keep.clone()
        updated[dropped] = False
        updated[grown] = True
        new[name] = updated.reshape(mask[name].shape)
    return Mask(new)


@torch.no_grad()
def apply_update(model: nn.Module, optimizer: torch.optim.Optimizer, old: Mask, new: Mask) -> BoundMask:
    """Switch ``model`` from mask ``old`` to ``new``: every weight not kept by both (dropped, regrown or pruned) and
    its momentum buffer become exactly zero, so a regrown weight starts from 0 with no stale momentum."""
    if set(old) != set(new):
        raise MaskError("the old and new masks cover different parameters")
    survivors = Mask({n: old[n] & new[n] for n in new}).on(model)
    _zero_pruned(survivors, optimizer)
    return new.on(model)


@torch.no_grad()
def _zero_pruned(bound: BoundMask, optimizer: torch.optim.Optimizer) -> None:
    bound.zero_weights()
    for param, keep in bound.pairs:
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        if buffer is not None:
            buffer.mul_(keep)


def masked_step(optimizer: torch.optim.Optimizer, bound: BoundMask) -> None:
    """Optimiser step after ``backward``: pruned weights get no gradient, so neither momentum nor weight decay
    moves them, and they are reset to zero after the step."""
    bound.zero_grads()
    optimizer.step()
    bound.zero_weights()
