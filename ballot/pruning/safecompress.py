"""SafeCompress (Zhu, Wang, Han; ASE 2022) with a fairness test in place of its attack test (docs/baselines.md).

Test-driven dynamic sparse training from scratch: start at theta_0 under a random ERK mask (kept weights scaled by
1 / sqrt(layer density) by default) and train with cross-entropy plus a fairness term. Every ``update_frequency``
steps build one candidate mask per update strategy (drop the smallest weights, regrow as many), test each candidate on
the validation split with the score acc - mu * CWV, and keep the best candidate only when it passes (scores at least
the current model's score minus a tolerance); otherwise the update is rejected. The checkpoint returned is the epoch
with the best validation score.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ballot.config import SafeCompressConfig
from ballot.masks import Mask
from ballot.pruning.base import MethodDetails, PruneContext, PruneResult
from ballot.pruning.dst import (
    apply_update,
    death_rate_at,
    drop_and_grow,
    erk_random_mask,
    masked_step,
    rescale_to_density,
)
from ballot.pruning.fair_terms import class_loss_variance
from ballot.pruning.loop import batches, epoch_bar, set_lr
from ballot.train import floored, has_batchnorm, steps_per_epoch


def validation_score(metrics: dict[str, Any], cwv_weight: float) -> float:
    """The fairness test's score: val acc - mu * val CWV (higher is better)."""
    return float(metrics["acc"] - cwv_weight * metrics["cwv"])


def lr_at(cfg: SafeCompressConfig, epoch: int) -> float:
    """Step decay: lr x gamma after each milestone epoch int(fraction x epochs) (MultiStepLR, stepped per epoch)."""
    passed = sum(epoch >= int(fraction * cfg.epochs) for fraction in cfg.lr_milestones)
    return cfg.lr * cfg.lr_gamma ** passed


def update_every(cfg: SafeCompressConfig, total_steps: int) -> int:
    """Optimiser steps between mask updates: update_frequency, else about ``updates`` evenly spread updates."""
    return cfg.update_frequency or max(1, total_steps // (cfg.updates + 1))


@torch.no_grad()
def gated_update(model: nn.Module, optimizer: torch.optim.Optimizer, mask: Mask, score: Callable[[nn.Module], float],
                 death_rate: float, growth: list[str], tolerance: float, generator: torch.Generator,
                 grads: dict[str, torch.Tensor] | None = None) -> tuple[Mask, dict[str, Any]]:
    """One candidate per growth strategy, each tested with ``score``; the best is applied when it scores at least
    the current model's score minus ``tolerance``, else the mask, weights and optimiser state stay as they were.

    Returns the mask now in force and a record of the test."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in mask}
    current = score(model)
    candidates = {g: drop_and_grow(saved, mask, death_rate, g, generator, grads) for g in growth}
    scores = {}
    for growth_kind, candidate in candidates.items():
        for name in mask:
            params[name].copy_(saved[name] * candidate[name].to(saved[name].device, saved[name].dtype))
        scores[growth_kind] = score(model)
    for name in mask:
        params[name].copy_(saved[name])
    best = max(scores, key=lambda g: scores[g])  # the first listed strategy wins a tie
    accepted = scores[best] >= current - tolerance
    moved = sum(int((candidates[best][n] & ~mask[n]).sum()) for n in mask)
    record = {"death_rate": death_rate, "current": current, "candidates": scores, "accepted": accepted,
              "chosen": best if accepted else None, "regrown": moved if accepted else 0}
    if not accepted:
        return mask, record
    apply_update(model, optimizer, mask, candidates[best])
    return candidates[best], record


def fairness_term(ctx: PruneContext, cfg: SafeCompressConfig
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The term added to the batch's mean cross-entropy (before the weight lambda), or None for 'none'."""
    if cfg.fair_loss == "none" or cfg.fair_loss_weight == 0:
        return None
    if cfg.fair_loss == "variance":
        return lambda per_sample, y: class_loss_variance(per_sample, y, ctx.data.num_classes)
    weights = ctx.dense_class_weights.to(ctx.device)
    return lambda per_sample, y: (per_sample * weights[y]).sum() / weights[y].sum()


@dataclass
class SafeCompressDetails(MethodDetails):
    initial_counts: dict[str, int]
    update_every: int  # steps between mask updates
    updates: list[dict[str, Any]]  # every fairness test: step, death rate, candidate scores, accepted
    accepted: int
    rejected: int
    best_epoch: int  # the checkpoint kept (best validation score)
    best_val_score: float
    search_history: list[dict[str, Any]]  # per epoch of the sparse training
    seconds: float


def prune(ctx: PruneContext) -> PruneResult:
    """Test-driven dynamic sparse training from theta_0 (see the module docstring); prune.final_train 'refined'
    additionally retrains the chosen mask with the refined schedule (ctx.train_rewound: from theta_k, or as
    refine_start says)."""
    cfg = floored(ctx.config.safecompress, len(ctx.data.train))
    started = time.perf_counter()
    model = ctx.model_from(ctx.dense.init_state)
    mask_generator = torch.Generator().manual_seed(ctx.seed)
    batch_generator = torch.Generator().manual_seed(ctx.seed)
    mask = erk_random_mask(model, ctx.density, ctx.config.min_per_layer, mask_generator)
    initial_counts = mask.counts()
    if cfg.rescale_init:
        rescale_to_density(model, mask)
    bound = mask.on(model)
    bound.zero_weights()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    train_split = ctx.data.train
    x_all, y_all = train_split.x.to(ctx.device), train_split.y.to(ctx.device)
    total = cfg.epochs * steps_per_epoch(len(train_split), cfg.batch_size)
    every = update_every(cfg, total)
    term = fairness_term(ctx, cfg)
    refined = ctx.config.final_train == "refined"
    report = None if refined else ctx.on_epoch  # the refined retraining reports its own epochs

    def score(m: nn.Module) -> float:
        return validation_score(ctx.val_metrics(m), cfg.cwv_weight)

    steps, updates, history = 0, [], []
    best: dict[str, Any] = {"score": -math.inf}
    for epoch in epoch_bar(cfg.epochs, "safecompress", ctx.progress):
        lr = lr_at(cfg, epoch)
        set_lr(optimizer, lr)
        model.train()
        loss_sum, correct = torch.zeros((), device=ctx.device), torch.zeros((), device=ctx.device, dtype=torch.long)
        for idx in batches(len(train_split), cfg.batch_size, batch_generator, ctx.device, has_batchnorm(model)):
            x, y = x_all[idx], y_all[idx]
            logits = model(x)
            per_sample = F.cross_entropy(logits, y, reduction="none")
            loss = per_sample.mean() if term is None else per_sample.mean() + cfg.fair_loss_weight * term(per_sample, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            due = (steps + 1) % every == 0 and steps + 1 < total
            grads = ({n: p.grad.detach().clone() for n, p in model.named_parameters() if n in mask}
                     if due and "gradient" in cfg.growth else None)
            masked_step(optimizer, bound)
            steps += 1
            loss_sum += per_sample.detach().sum()
            correct += (logits.detach().argmax(1) == y).sum()
            if due:
                rate = death_rate_at(steps, total, cfg.death_rate, cfg.death_rate_min)
                mask, record = gated_update(model, optimizer, mask, score, rate, cfg.growth, cfg.tolerance,
                                            mask_generator, grads)
                bound = mask.on(model)
                model.train()
                updates.append({"step": steps, **record})
        metrics = ctx.val_metrics(model)
        value = validation_score(metrics, cfg.cwv_weight)
        history.append({"epoch": epoch + 1, "lr": lr, "train_loss": float(loss_sum) / len(train_split),
                        "train_acc": float(correct) / len(train_split), "val_acc": metrics["acc"],
                        "val_cwv": metrics["cwv"], "val_score": value})
        if report is not None:
            report(epoch + 1, metrics)
        if value > best["score"]:
            best = {"score": value, "epoch": epoch + 1, "mask": mask,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best["state"])
    mask = best["mask"]
    details = SafeCompressDetails(initial_counts, every, updates, sum(u["accepted"] for u in updates),
                                  sum(not u["accepted"] for u in updates), best["epoch"], best["score"], history,
                                  time.perf_counter() - started)
    if refined:
        model, final = ctx.train_rewound(mask, "safecompress refined")
        return PruneResult(mask, model, details, history=final.history, final_choice=final.final_choice)
    return PruneResult(mask, model, details, history=history)
