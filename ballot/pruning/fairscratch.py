"""Fair Scratch Tickets (Tang, Yao, Li, Liu; CVPR 2023): a fair sparse subnetwork found without training weights.

weights  theta_0's signs times the constant sqrt(2 / fan_in) ("signed constant"), frozen; biases 0 and
         BatchNorm at weight 1 / bias 0, frozen (the original's layers have no bias and non-affine BatchNorm).
scores   one learnable score per prunable weight, kaiming-uniform; the mask is the top-k of |score| per layer
         (the original) or over the whole network (scores on a common scale); exactly the budget either way. The
         gradient reaches every score straight through the mask (edge-popup), the pruned entries' scores included.
loss     cross-entropy + lambda * fairness penalty: the demographic-parity gap over the data's sensitive attribute
         when it has one (the original's setting), else the variance of the per-class losses.
choice   the epoch with the best validation accuracy, as in the original (docs/baselines.md).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ballot.config import FairScratchConfig
from ballot.errors import ConfigError, MaskError
from ballot.masks import Mask, budget, prunable_names
from ballot.pruning.base import MethodDetails, PruneContext, PruneResult
from ballot.pruning.fair_terms import class_loss_variance, group_parity_gap
from ballot.pruning.loop import batches, epoch_bar, set_lr
from ballot.train import floored, has_batchnorm


def bias_name(weight: str) -> str:
    """The name of the bias that goes with the prunable weight ``weight``: a layer's ``bias``, attention's
    ``in_proj_bias`` (also for its separate q, k and v projections), a recurrent layer's ``bias_ih_l0`` for
    ``weight_ih_l0``."""
    prefix, _, leaf = weight.rpartition(".")
    leaf = "in_proj_bias" if leaf in ("q_proj_weight", "k_proj_weight", "v_proj_weight") else leaf.replace(
        "weight", "bias", 1)
    return f"{prefix}.{leaf}" if prefix else leaf


@torch.no_grad()
def freeze_as_scratch(model: nn.Module, density: float | None = None) -> None:
    """Signed-constant prunable weights sign(w) * sqrt(2 / fan_in) (sqrt(2 / (fan_in * density)) given ``density``:
    the original's scale_fan; fan_in: a row's size), zero biases of their layers, BatchNorm at 1 / 0; nothing
    trainable."""
    params = dict(model.named_parameters())
    for name in prunable_names(model):
        weight = params[name]
        fan = weight[0].numel() * (density if density is not None else 1.0)
        weight.copy_(weight.sign() * math.sqrt(2.0 / fan))  # gain sqrt(2) (ReLU), fan-in mode
        bias = params.get(bias_name(name))
        if bias is not None:
            bias.zero_()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            module.weight.fill_(1.0)
            module.bias.zero_()
    model.requires_grad_(False)


def uniform_counts(sizes: dict[str, int], keep: int, floor: int) -> dict[str, int]:
    """Per-layer counts proportional to layer size (one density everywhere), each at least ``floor`` (or the layer's
    size), summing exactly to ``keep``; the rounding goes to the layers furthest from their share."""
    lowest = {n: min(s, floor) for n, s in sizes.items()}
    if sum(lowest.values()) > keep:
        raise MaskError(f"{len(sizes)} layers x min_per_layer {floor} need {sum(lowest.values())} weights, more than "
                        f"the budget of {keep}: lower prune.min_per_layer or raise the density")
    total = sum(sizes.values())
    wanted = {n: keep * s / total for n, s in sizes.items()}
    counts = {n: max(lowest[n], math.floor(w)) for n, w in wanted.items()}
    while sum(counts.values()) != keep:
        step = 1 if sum(counts.values()) < keep else -1
        # add where the count falls furthest below its share, take where it lies furthest above
        for name in sorted(sizes, key=lambda n: (step * (counts[n] - wanted[n]), n)):
            if sum(counts.values()) != keep and lowest[name] <= counts[name] + step <= sizes[name]:
                counts[name] += step
    return counts


def kaiming_uniform_scores(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): kaiming-uniform with a = sqrt(5), the original's score initialisation."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


class ScratchTicket:
    """A frozen network, a score per prunable weight, and the mask those scores choose."""

    def __init__(self, model: nn.Module, density: float, selection: str, min_per_layer: int,
                 generator: torch.Generator, scale_fan: bool = False) -> None:
        freeze_as_scratch(model, density if scale_fan else None)
        self.model = model
        params = dict(model.named_parameters())
        self.names = prunable_names(model)
        self.weights = {n: params[n] for n in self.names}
        device = self.weights[self.names[0]].device
        self.scores = {n: nn.Parameter(kaiming_uniform_scores(params[n].shape, generator).to(device))
                       for n in self.names}
        sizes = {n: params[n].numel() for n in self.names}
        self.keep_total = budget(sum(sizes.values()), density)
        self.floors = {n: min(sizes[n], min_per_layer) for n in self.names}
        counts = uniform_counts(sizes, self.keep_total, min_per_layer)  # also refuses floors beyond the budget
        self.counts = counts if selection == "per_layer" else None

    @torch.no_grad()
    def keep(self) -> dict[str, torch.Tensor]:
        """The current mask: the largest |score| entries, exactly ``keep_total`` of them (each layer at least its
        floor), per layer or network-wide. Network-wide, each layer's |score| is divided by its initial bound
        1/sqrt(fan_in), so layers are ranked on one scale rather than by their fan-in."""
        if self.counts is not None:
            return {n: _top(self.scores[n].detach().abs().flatten(), self.counts[n]).reshape(self.scores[n].shape)
                    for n in self.names}
        magnitudes = {n: self.scores[n].detach().abs().flatten() * math.sqrt(self.scores[n][0].numel())
                      for n in self.names}
        chosen = {n: _top(magnitudes[n], self.floors[n]) for n in self.names}
        rest = torch.cat([magnitudes[n].masked_fill(chosen[n], -math.inf) for n in self.names])
        extra = _top(rest, self.keep_total - sum(self.floors.values()))
        keep, start = {}, 0
        for name in self.names:
            size = magnitudes[name].numel()
            keep[name] = (chosen[name] | extra[start:start + size]).reshape(self.scores[name].shape)
            start += size
        return keep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits with the masked weights; the mask's gradient passes straight through to the scores."""
        keep = self.keep()
        masked = {}
        for name in self.names:
            magnitude = self.scores[name].abs()
            straight_through = keep[name].to(magnitude.dtype) + magnitude - magnitude.detach()
            masked[name] = self.weights[name] * straight_through
        return functional_call(self.model, masked, (x,))

    def mask(self) -> Mask:
        return Mask(self.keep())

    def baked(self) -> nn.Module:
        """A plain copy of the network with the pruned weights set to zero."""
        model = copy.deepcopy(self.model)
        self.mask().apply(model)
        return model


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a flat tensor."""
    chosen = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k > 0:
        chosen[torch.topk(values, k).indices] = True
    return chosen


def penalty_kind(cfg: FairScratchConfig, has_group: bool) -> str:
    """The penalty in force: 'auto' is group_parity when the data has a sensitive attribute, else class_variance."""
    if cfg.penalty == "auto":
        return "group_parity" if has_group else "class_variance"
    if cfg.penalty == "group_parity" and not has_group:
        raise ConfigError("prune.fairscratch.penalty: 'group_parity' needs a dataset with a group (sensitive "
                          "attribute); use 'class_variance' or 'auto'")
    return cfg.penalty


@dataclass
class ScoreFit:
    """What score training found: the best epoch's plain sparse model, its mask and the per-epoch history."""

    model: nn.Module
    mask: Mask
    best_epoch: int
    best_val_acc: float
    penalty: str
    history: list[dict[str, float]] = field(default_factory=list)


def fit_scores(ticket: ScratchTicket, ctx: PruneContext, cfg: FairScratchConfig, report: bool = True) -> ScoreFit:
    """SGD on the scores (per-epoch cosine lr), loss = cross-entropy + lambda * penalty; keeps the epoch with the
    best validation accuracy. ``report``: call ``ctx.on_epoch`` after each epoch."""
    train_split = ctx.data.train
    kind = penalty_kind(cfg, train_split.group is not None)
    x_all, y_all = train_split.x.to(ctx.device), train_split.y.to(ctx.device)
    group_all = train_split.group.to(ctx.device) if train_split.group is not None else None
    optimizer = torch.optim.SGD(list(ticket.scores.values()), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(ctx.seed)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"acc": -math.inf}
    for epoch in epoch_bar(cfg.epochs, "fairscratch", ctx.progress):
        lr = 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs)) * cfg.lr
        set_lr(optimizer, lr)
        ticket.model.train()
        loss_sum, pen_sum = torch.zeros((), device=ctx.device), torch.zeros((), device=ctx.device)
        for idx in batches(len(train_split), cfg.batch_size, generator, ctx.device, has_batchnorm(ticket.model)):
            x, y = x_all[idx], y_all[idx]
            logits = ticket(x)
            per_sample = F.cross_entropy(logits, y, reduction="none")
            if kind == "group_parity":
                penalty = group_parity_gap(logits, group_all[idx])  # type: ignore[index]
            elif kind == "class_variance":
                penalty = class_loss_variance(per_sample, y, ctx.data.num_classes)
            else:
                penalty = torch.zeros((), device=ctx.device)
            loss = per_sample.mean() + cfg.fairness_weight * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += per_sample.detach().sum()
            pen_sum += penalty.detach() * len(idx)
        baked = ticket.baked()
        metrics = ctx.val_metrics(baked)
        history.append({"epoch": epoch + 1, "lr": lr, "train_loss": float(loss_sum) / len(train_split),
                        "penalty": float(pen_sum) / len(train_split), "val_acc": metrics["acc"],
                        "val_cwv": metrics["cwv"]})
        if report and ctx.on_epoch is not None:
            ctx.on_epoch(epoch + 1, metrics)
        if metrics["acc"] > best["acc"]:
            best = {"acc": metrics["acc"], "epoch": epoch + 1, "model": baked, "mask": ticket.mask()}
    return ScoreFit(best["model"], best["mask"], best["epoch"], best["acc"], kind, history)


@dataclass
class FairScratchDetails(MethodDetails):
    penalty: str  # the fairness penalty that ran (auto resolved)
    selection: str
    counts: dict[str, int]
    best_epoch: int
    best_val_acc: float
    search_history: list[dict[str, Any]]  # per epoch of the score training
    seconds: float


def prune(ctx: PruneContext) -> PruneResult:
    """Score training on theta_0's signed-constant weights (see the module docstring); prune.final_train 'refined'
    additionally trains the found mask's weights with the refined schedule (ctx.train_rewound: from theta_k, or as
    refine_start says)."""
    cfg = floored(ctx.config.fairscratch, len(ctx.data.train))
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(ctx.seed)
    ticket = ScratchTicket(ctx.model_from(ctx.dense.init_state), ctx.density, cfg.selection,
                           ctx.config.min_per_layer, generator, cfg.scale_fan)
    refined = ctx.config.final_train == "refined"
    fit = fit_scores(ticket, ctx, cfg, report=not refined)
    model = ctx.model_from(fit.model.state_dict())
    details = FairScratchDetails(fit.penalty, cfg.selection, fit.mask.counts(), fit.best_epoch, fit.best_val_acc,
                                 fit.history, time.perf_counter() - started)
    if refined:
        model, final = ctx.train_rewound(fit.mask, "fairscratch refined")
        return PruneResult(fit.mask, model, details, history=final.history, final_choice=final.final_choice)
    return PruneResult(fit.mask, model, details, history=fit.history)
