"""Ballot (method.md section 5): collect -> score -> select, then refined training.

collect  ``GradientCollector`` sums, during the observation training steps themselves, the accuracy
         gradient g (cross-entropy) and the fairness gradient f (class-reweighted cross-entropy).
score    ``conflict_strength`` and ``importance``: per layer, g and f are scaled to unit RMS; a weight
         conflicts when -eta * g_hat * f_hat > tau (the two gradients pull it opposite ways, strongly).
select   ``cast_ballot`` gives one vote to the top-k non-conflicting candidates by importance;
         ``select_mask`` keeps the k most-voted weights, ties broken by final magnitude.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from ballot.config import BallotConfig
from ballot.fairness import evaluate, fairness_class_weights, fairness_objective
from ballot.masks import Mask, budget, magnitude_scores
from ballot.pruning.base import PruneContext, PruneResult
from ballot.train import steps_per_epoch, train


def _unit_rms(t: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` divided by its RMS over the entries selected by ``within`` (all entries when None)."""
    selected = t if within is None else t[within]
    rms = selected.pow(2).mean().sqrt() if selected.numel() else torch.zeros((), device=t.device)
    return t / rms if rms > 0 else torch.zeros_like(t)


def conflict_strength(g: torch.Tensor, f: torch.Tensor, eta: float, within: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """-eta * g_hat * f_hat, with g and f scaled to unit RMS over the layer's candidate weights (``within``);
    > 0 where the two gradients disagree in sign. eta scales the fairness gradient, so eta = 0 turns it off."""
    return -eta * _unit_rms(g, within) * _unit_rms(f, within)


def importance(weight: torch.Tensor, g: torch.Tensor, f: torch.Tensor, kind: str, eta: float,
               within: torch.Tensor | None = None) -> torch.Tensor:
    """|w| ('magnitude') or |w * (g_hat + eta * f_hat)| ('taylor')."""
    if kind == "magnitude":
        return weight.abs()
    if kind == "taylor":
        return (weight * (_unit_rms(g, within) + eta * _unit_rms(f, within))).abs()
    raise ValueError(f"unknown importance '{kind}'")


def cast_ballot(scores: dict[str, torch.Tensor], eligible: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """One vote to each of the ``k`` best-scoring eligible weights (fewer when fewer are eligible)."""
    flat_scores = torch.cat([scores[n].flatten() for n in scores])
    flat_ok = torch.cat([eligible[n].flatten() for n in scores])
    candidates = torch.nonzero(flat_ok).flatten()
    order = torch.argsort(flat_scores[candidates], descending=True, stable=True)
    votes = torch.zeros_like(flat_ok)
    votes[candidates[order[:k]]] = True
    out, start = {}, 0
    for name in scores:
        size = scores[name].numel()
        out[name] = votes[start:start + size].reshape(scores[name].shape)
        start += size
    return out


def select_mask(votes: dict[str, torch.Tensor], magnitudes: dict[str, torch.Tensor], density: float,
                min_per_layer: int = 1) -> Mask:
    """The most-voted weights at exactly ``density``; among equal votes the larger |w| wins."""
    peak = max(float(m.max()) for m in magnitudes.values())
    scale = 2.0 * peak if peak > 0 else 1.0
    # |w| / (2 max|w|) < 0.5 never outweighs one vote, so it only orders weights with equal votes.
    combined = {n: votes[n].double() + magnitudes[n].double() / scale for n in votes}
    return Mask.top_k(combined, density, min_per_layer)


class GradientCollector:
    """A training-step hook summing g and f over a ballot period and casting a ballot at its end."""

    def __init__(self, model: nn.Module, candidate: Mask, ctx: PruneContext, cfg: BallotConfig,
                 period: int, k: int) -> None:
        params = dict(model.named_parameters())
        self.model, self.ctx, self.cfg, self.period, self.k = model, ctx, cfg, period, k
        self.names = list(candidate)
        self.params = [params[n] for n in self.names]
        self.candidate = {n: candidate[n].to(self.params[0].device) for n in self.names}
        self.g = [torch.zeros_like(p) for p in self.params]
        self.f = [torch.zeros_like(p) for p in self.params]
        self.votes = {n: torch.zeros(p.shape, dtype=torch.int32) for n, p in zip(self.names, self.params)}
        self.class_weights = torch.ones(ctx.data.num_classes)
        self.history: list[dict[str, Any]] = []
        self._collecting = False
        self._collected = 0  # steps collected in the current period

    def before_backward(self, step: int, per_sample_loss: torch.Tensor, y: torch.Tensor) -> None:
        if step % self.period == 0:
            self._refresh_class_weights()
        self._collecting = step % self.cfg.collect_every == 0
        if self._collecting and self.cfg.fairness_weight > 0:
            w = self.class_weights.to(y.device)[y]
            fair_loss = (per_sample_loss * w).sum() / w.sum()
            for acc, grad in zip(self.f, torch.autograd.grad(fair_loss, self.params, retain_graph=True)):
                acc.add_(grad)

    def after_backward(self, step: int) -> None:
        if self._collecting:
            for acc, p in zip(self.g, self.params):
                acc.add_(p.grad)
            self._collected += 1
        if (step + 1) % self.period == 0:
            self.cast(step + 1)

    def finish(self, steps: int) -> None:
        """Cast a ballot on what the last, incomplete period collected (step 0 is always collected)."""
        self.cast(steps)

    def _refresh_class_weights(self) -> None:
        val = self.ctx.data.val
        metrics = evaluate(self.model, val.x, val.y, self.ctx.data.num_classes, device=self.ctx.device)
        self.class_weights = fairness_class_weights(metrics["per_class"], self.cfg.class_weight_floor)

    @torch.no_grad()
    def cast(self, step: int) -> None:
        """Score the period's summed gradients, vote, and start a new period (no vote if nothing was collected)."""
        if self._collected == 0:
            return
        cfg = self.cfg
        scores, eligible, conflicts = {}, {}, {}
        for name, p, g, f in zip(self.names, self.params, self.g, self.f):
            within = self.candidate[name]
            strength = conflict_strength(g, f, cfg.fairness_weight, within)
            veto = (strength > cfg.conflict_threshold) & within
            scores[name] = importance(p.detach(), g, f, cfg.importance, cfg.fairness_weight, within).cpu()
            eligible[name] = (self.candidate[name] & ~veto).cpu()
            conflicts[name] = int(veto.sum())
        ballot = cast_ballot(scores, eligible, self.k)
        for name in self.names:
            self.votes[name] += ballot[name].int()
        unvetoed = cast_ballot(scores, {n: self.candidate[n].cpu() for n in self.names}, self.k)
        changed = sum(int((unvetoed[n] & ~ballot[n]).sum()) for n in self.names)
        self.history.append({
            "ballot": len(self.history) + 1, "step": step, "conflicts": sum(conflicts.values()),
            "conflicts_per_layer": conflicts, "vetoed_from_top_k": changed,
            "class_weights": [round(float(w), 4) for w in self.class_weights],
        })
        for acc in self.g + self.f:
            acc.zero_()
        self._collected = 0


def _mixed_weights(class_weights: torch.Tensor, mix: float) -> torch.Tensor | None:
    """(1 - mix) * uniform + mix * fairness weights; None (plain CE) when mix is 0."""
    return None if mix == 0 else (1 - mix) + mix * class_weights


def prune(ctx: PruneContext) -> PruneResult:
    """Candidate mask -> observation with voting -> final mask -> rewind to theta_k -> refined training."""
    cfg = ctx.config.ballot
    if cfg.obs_density < ctx.density:
        raise ValueError(f"ballot.obs_density ({cfg.obs_density}) must be >= the target density ({ctx.density})")
    started = time.perf_counter()
    trained = ctx.model_from(ctx.dense.trained_state)
    candidate = Mask.top_k(magnitude_scores(trained), cfg.obs_density, ctx.config.min_per_layer)

    observer = ctx.model_from(ctx.dense.rewind_state)
    k = budget(candidate.total, ctx.density)
    per_epoch = steps_per_epoch(len(ctx.data.train), ctx.config.retrain.batch_size)
    collector = GradientCollector(observer, candidate, ctx, cfg, cfg.ballot_every or per_epoch, k)
    obs_cfg = dataclasses.replace(ctx.config.retrain, epochs=cfg.obs_epochs, schedule="constant")
    train(observer, ctx.data.train, obs_cfg, seed=ctx.seed, mask=candidate, device=ctx.device, hook=collector,
          desc="ballot observe", progress=ctx.progress)
    collector.finish(per_epoch * cfg.obs_epochs)
    mask = select_mask(collector.votes, magnitude_scores(observer, list(candidate)), ctx.density,
                       ctx.config.min_per_layer)
    observe_seconds = time.perf_counter() - started

    model = ctx.model_from(ctx.dense.rewind_state)
    val = ctx.data.val
    if cfg.refine:
        refine_cfg = cfg.refine_train
        end_metrics = evaluate(observer, val.x, val.y, ctx.data.num_classes, device=ctx.device)
        weights = _mixed_weights(fairness_class_weights(end_metrics["per_class"], cfg.class_weight_floor),
                                 cfg.fairness_loss_weight)
    else:
        refine_cfg, weights = ctx.config.retrain, None

    epochs_done = 0

    def val_objective(m: nn.Module) -> float:
        nonlocal epochs_done
        epochs_done += 1
        metrics = evaluate(m, val.x, val.y, ctx.data.num_classes, device=ctx.device)
        if ctx.on_epoch is not None:
            ctx.on_epoch(epochs_done, metrics)
        return fairness_objective(metrics, cfg.objective_mcd_weight)

    watch = refine_cfg.schedule == "plateau" or ctx.on_epoch is not None
    result = train(model, ctx.data.train, refine_cfg, seed=ctx.seed, mask=mask, device=ctx.device,
                   class_weights=weights, desc="ballot refine", progress=ctx.progress,
                   epoch_metric=val_objective if watch else None)
    ticket = Mask.top_k(magnitude_scores(trained), ctx.density, ctx.config.min_per_layer)
    overlap = sum(int((ticket[n] & mask[n]).sum()) for n in mask) / mask.kept
    details = {
        "ballots": collector.history,
        "votes": collector.votes,
        "overlap_with_magnitude_ticket": overlap,
        "observe_seconds": observe_seconds,
        "refine_seconds": result.seconds,
        "history": result.history,
    }
    return PruneResult(mask, model, details)

