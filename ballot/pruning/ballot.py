"""Ballot (docs/ballot.md): per-layer budgets -> observe and vote -> select -> refined training.

budget   ``layer_counts``: how many weights each layer keeps (ERK shares with a floor, or the magnitude ticket's).
collect  ``GradientCollector`` sums, during the observation training steps themselves, the accuracy gradient g
         (cross-entropy) and the fairness gradient f (cross-entropy weighted by the dense model's class weights).
score    per layer, g and f are scaled to unit RMS. A weight is *contested* when the two pull it opposite ways:
         fairness would grow it (-w*f_hat > 0) while accuracy would shrink it (-w*g_hat < 0), strongly
         (-eta*g_hat*f_hat > tau).
vote     ``cast_ballot``: each layer's votes go to its most important weights (|w|), except a share
         ``protect_fraction`` that goes to the contested weights of highest fairness saliency -w*f_hat
         (conflict 'protect'); 'veto' instead bars contested weights; 'none' is plain magnitude voting.
select   ``select_mask``: each layer keeps its most-voted weights, ties broken by final magnitude.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn

from ballot.config import BallotConfig
from ballot.masks import BoundMask, Mask, density_schedule, erk_counts, magnitude_scores
from ballot.pruning.dst import apply_update, drop_and_grow
from ballot.pruning.base import PruneContext, PruneResult
from ballot.train import StepHook, steps_per_epoch, train


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


def contested(weight: torch.Tensor, g: torch.Tensor, f: torch.Tensor, eta: float, tau: float,
              within: torch.Tensor | None = None) -> torch.Tensor:
    """Weights the fairness gradient would grow and the accuracy gradient would shrink, with conflict strength
    above ``tau``: a gradient step on the fair loss moves |w| up (w * f < 0) while one on the plain loss moves
    it down (w * g > 0)."""
    return (weight * f < 0) & (weight * g > 0) & (conflict_strength(g, f, eta, within) > tau)


def importance(weight: torch.Tensor, g: torch.Tensor, f: torch.Tensor, kind: str, eta: float,
               within: torch.Tensor | None = None) -> torch.Tensor:
    """|w| ('magnitude') or |w * (g_hat + eta * f_hat)| ('taylor')."""
    if kind == "magnitude":
        return weight.abs()
    if kind == "taylor":
        return (weight * (_unit_rms(g, within) + eta * _unit_rms(f, within))).abs()
    raise ValueError(f"unknown importance '{kind}'")


def _top(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` best-scoring allowed entries (fewer when fewer are allowed; ties: earlier first)."""
    flat, ok = scores.flatten(), allowed.flatten()
    candidates = torch.nonzero(ok).flatten()
    order = torch.argsort(flat[candidates], descending=True, stable=True)
    chosen = torch.zeros_like(ok)
    chosen[candidates[order[:max(k, 0)]]] = True
    return chosen.reshape(scores.shape)


def cast_ballot(scores: torch.Tensor, eligible: torch.Tensor, k: int, protected_scores: torch.Tensor | None = None,
                protectable: torch.Tensor | None = None, protect: int = 0) -> torch.Tensor:
    """One layer's ballot: ``k`` votes, ``protect`` of them reserved for the best ``protected_scores`` among the
    ``protectable`` weights not voted for on ``scores``; the rest (and any reserved vote left unused) go to the
    best ``scores`` among the ``eligible``."""
    votes = _top(scores, eligible, k - protect)
    if protect and protected_scores is not None and protectable is not None:
        votes |= _top(protected_scores, protectable & eligible & ~votes, protect)
    return votes | _top(scores, eligible & ~votes, k - int(votes.sum()))


def select_mask(votes: dict[str, torch.Tensor], magnitudes: dict[str, torch.Tensor], counts: dict[str, int],
                protection: dict[str, torch.Tensor] | None = None, protect_fraction: float = 0.0) -> Mask:
    """Each layer's ``counts[name]`` most-voted weights (among equal votes the larger |w| wins), except a share
    ``protect_fraction`` that goes to the weights of highest ``protection`` score (> 0) not already chosen."""
    chosen = {}
    for name, v in votes.items():
        peak = float(magnitudes[name].max())
        # |w| / (2 max|w|) < 0.5 never outweighs one vote, so it only orders weights with equal votes.
        combined = v.double() + magnitudes[name].double() / (2.0 * peak if peak > 0 else 1.0)
        everyone = torch.ones_like(v, dtype=torch.bool)
        k = counts[name]
        if protection is None or protect_fraction == 0:
            chosen[name] = cast_ballot(combined, everyone, k)
        else:
            score = protection[name]
            chosen[name] = cast_ballot(combined, everyone, k, score, score > 0, round(protect_fraction * k))
    return Mask(chosen)


class GradientCollector(StepHook):
    """A training-step hook summing g and f over a ballot period and casting a ballot at its end."""

    def __init__(self, model: nn.Module, candidate: Mask, counts: dict[str, int], class_weights: torch.Tensor,
                 cfg: BallotConfig, period: int) -> None:
        params = dict(model.named_parameters())
        self.cfg, self.period, self.counts, self.class_weights = cfg, period, counts, class_weights
        self.fair_steps = cfg.obs_loss == "fair"  # the training step's own gradient is f (else g)
        self.names = list(candidate)
        self.params = [params[n] for n in self.names]
        self.candidate = {n: candidate[n].to(self.params[0].device) for n in self.names}
        self.g = [torch.zeros_like(p) for p in self.params]
        self.f = [torch.zeros_like(p) for p in self.params]
        self.votes = {n: torch.zeros(p.shape, dtype=torch.int32) for n, p in zip(self.names, self.params)}
        # summed over ballots: the fairness saliency -w*f_hat of a weight on the ballots where it was contested
        self.protection = {n: torch.zeros(p.shape) for n, p in zip(self.names, self.params)}
        self.history: list[dict[str, Any]] = []
        self._collecting = False
        self._collected = 0  # steps collected in the current period

    def before_backward(self, step: int, per_sample_loss: torch.Tensor, y: torch.Tensor) -> None:
        """On a collected step, the gradient of the loss the step does not train on, by one extra backward."""
        self._collecting = step % self.cfg.collect_every == 0
        if self._collecting and (self.fair_steps or self.cfg.fairness_weight > 0):
            if self.fair_steps:
                other, loss = self.g, per_sample_loss.mean()
            else:
                w = self.class_weights.to(y.device)[y]
                other, loss = self.f, (per_sample_loss * w).sum() / w.sum()
            for acc, grad in zip(other, torch.autograd.grad(loss, self.params, retain_graph=True)):
                acc.add_(grad)

    def after_backward(self, step: int) -> None:
        if self._collecting:
            for acc, p in zip(self.f if self.fair_steps else self.g, self.params):
                acc.add_(p.grad)
            self._collected += 1
        if (step + 1) % self.period == 0:
            self.cast(step + 1)

    def finish(self, steps: int) -> None:
        """Cast a ballot on what the last, incomplete period collected (step 0 is always collected)."""
        self.cast(steps)

    @torch.no_grad()
    def cast(self, step: int) -> None:
        """Score the period's summed gradients, vote, and start a new period (no vote if nothing was collected)."""
        if self._collected == 0:
            return
        cfg = self.cfg
        conflicts, changed = {}, 0
        for name, p, g, f in zip(self.names, self.params, self.g, self.f):
            within, w, k = self.candidate[name], p.detach(), self.counts[name]
            scores = importance(w, g, f, cfg.importance, cfg.fairness_weight, within)
            disputed = contested(w, g, f, cfg.fairness_weight, cfg.conflict_threshold, within) & within
            plain = cast_ballot(scores, within, k)
            ballot = cast_ballot(scores, within & ~disputed, k) if cfg.conflict == "veto" else plain
            if cfg.conflict == "protect":
                self.protection[name] += (-w * _unit_rms(f, within)).clamp(min=0).mul(disputed).cpu()
            self.votes[name] += ballot.int().cpu()
            conflicts[name] = int(disputed.sum())
            changed += int((ballot & ~plain).sum())
        self.history.append({"ballot": len(self.history) + 1, "step": step, "conflicts": sum(conflicts.values()),
                             "conflicts_per_layer": conflicts, "votes_vetoed": changed})
        for acc in self.g + self.f:
            acc.zero_()
        self._collected = 0


class FairRegrowth(StepHook):
    """Refined-training hook: once per ``period`` steps until ``until`` steps, each layer swaps a share of its kept
    weights (``fraction`` at the start, cosine-annealed to 0): the smallest |w| go, the pruned weights with the
    largest summed gradient of the growth loss come in at zero ('fair': the fairness-weighted training loss itself;
    'accuracy': plain cross-entropy, one extra backward on every ``collect_every``-th step)."""

    def __init__(self, model: nn.Module, bound: BoundMask, fraction: float, by: str, period: int, until: int,
                 collect_every: int, seed: int) -> None:
        params = dict(model.named_parameters())
        self.model, self.bound, self.fraction, self.by = model, bound, fraction, by
        self.period, self.until, self.collect_every = period, until, collect_every
        self.names = bound.names
        self.params = [params[n] for n in self.names]
        self.sums = [torch.zeros_like(p) for p in self.params]
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer: torch.optim.Optimizer | None = None
        self.updates: list[dict[str, Any]] = []

    def start(self, optimizer: torch.optim.Optimizer, bound: BoundMask | None) -> None:
        self.optimizer = optimizer

    def before_backward(self, step: int, per_sample_loss: torch.Tensor, y: torch.Tensor) -> None:
        if self.by == "accuracy" and step % self.collect_every == 0 and step < self.until:
            for acc, grad in zip(self.sums, torch.autograd.grad(per_sample_loss.mean(), self.params, retain_graph=True)):
                acc.add_(grad)

    def after_backward(self, step: int) -> None:
        if step >= self.until:
            return
        if self.by == "fair":
            for acc, p in zip(self.sums, self.params):
                acc.add_(p.grad)
        if (step + 1) % self.period == 0 and step + 1 < self.until:
            self.swap(step + 1)

    @torch.no_grad()
    def swap(self, step: int) -> None:
        rate = self.fraction * 0.5 * (1 + math.cos(math.pi * step / self.until))
        old = self.bound.mask()
        weights = {n: p.detach() for n, p in zip(self.names, self.params)}
        sums = {n: s for n, s in zip(self.names, self.sums)}
        new = drop_and_grow(weights, old, rate, "gradient", self.generator, sums)
        assert self.optimizer is not None
        apply_update(self.model, self.optimizer, old, new)
        self.bound.replace(new)
        self.updates.append({"step": step, "rate": rate, "moved": sum(int((new[n] & ~old[n]).sum()) for n in new)})
        for acc in self.sums:
            acc.zero_()


def round_counts(ctx: PruneContext, shapes: dict[str, tuple[int, ...]]) -> list[dict[str, int]]:
    """Per-layer kept counts of each round: ERK shares (with ``layer_floor``) at the round's density, each round
    within the previous one, so the masks can be nested."""
    cfg = ctx.config.ballot
    counts: list[dict[str, int]] = []
    for density in density_schedule(ctx.density, cfg.rounds):
        counts.append(erk_counts(shapes, density, cfg.layer_floor, ctx.config.min_per_layer,
                                 capacity=counts[-1] if counts else None))
    return counts


def observe(ctx: PruneContext, mask: Mask, counts: dict[str, int], desc: str) -> tuple[Mask, GradientCollector]:
    """Train ``mask`` from theta_k (prune.retrain, ``obs_epochs``), casting a ballot each period; the next mask is
    each layer's ``counts`` most-voted survivors."""
    cfg = ctx.config.ballot
    observer = ctx.model_from(ctx.dense.rewind_state)
    per_epoch = steps_per_epoch(len(ctx.data.train), ctx.config.retrain.batch_size)
    collector = GradientCollector(observer, mask, counts, ctx.dense_class_weights, cfg, cfg.ballot_every or per_epoch)
    obs_cfg = dataclasses.replace(ctx.config.retrain, epochs=cfg.obs_epochs)
    train(observer, ctx.data.train, obs_cfg, seed=ctx.seed, mask=mask, device=ctx.device, hook=collector,
          class_weights=ctx.dense_class_weights if cfg.obs_loss == "fair" else None, desc=desc,
          progress=ctx.progress)
    collector.finish(per_epoch * cfg.obs_epochs)
    protect = cfg.protect_fraction if cfg.conflict == "protect" else 0.0
    selected = select_mask(collector.votes, magnitude_scores(observer, list(mask)), counts, collector.protection, protect)
    return selected, collector


def prune(ctx: PruneContext) -> PruneResult:
    """Rounds of observation and voting at shrinking densities, then rewind to theta_k and the final training.

    Round 1 keeps each layer's largest weights of theta_T (its ERK count at density ** (1 / rounds)); every
    further round trains the current mask from theta_k and keeps the most-voted survivors at the next density of
    the schedule, so the masks are nested and the last one has exactly the target density.
    """
    cfg = ctx.config.ballot
    started = time.perf_counter()
    trained = ctx.model_from(ctx.dense.trained_state)
    scores = magnitude_scores(trained)
    counts = round_counts(ctx, {name: tuple(t.shape) for name, t in scores.items()})
    mask = Mask.top_k_per_layer(scores, counts[0])
    rounds: list[dict[str, Any]] = [{"density": mask.density(), "kept": mask.kept}]
    masks, votes = [mask], {}
    for number, kept in enumerate(counts[1:], start=2):
        mask, collector = observe(ctx, mask, kept, f"ballot round {number}")
        masks.append(mask)
        votes = collector.votes
        rounds.append({"density": mask.density(), "kept": mask.kept, "ballots": collector.history})
    observe_seconds = time.perf_counter() - started

    model = ctx.model_from(ctx.dense.rewind_state)
    regrowth = None
    if cfg.regrow_fraction > 0 and ctx.config.refined():
        bound = mask.on(model)
        per_epoch = steps_per_epoch(len(ctx.data.train), cfg.refine_train.batch_size)
        until = int(0.75 * per_epoch * cfg.refine_train.epochs)
        regrowth = FairRegrowth(model, bound, cfg.regrow_fraction, cfg.regrow_by, per_epoch, until, cfg.collect_every,
                                ctx.seed)
        result = ctx.final_train(model, bound, "ballot refine", hook=regrowth)
        mask = bound.mask()
    else:
        result = ctx.final_train(model, mask, "ballot refine")
    ticket = Mask.top_k(scores, ctx.density, ctx.config.min_per_layer)
    overlap = sum(int((ticket[n] & mask[n]).sum()) for n in mask) / mask.kept
    details = {
        "rounds": rounds,
        "votes": votes,
        "class_weights": [round(float(w), 4) for w in ctx.dense_class_weights],
        "layer_counts": mask.counts(),
        "overlap_with_magnitude_ticket": overlap,
        "observe_seconds": observe_seconds,
        "refine_seconds": result.seconds,
        "history": result.history,
        "regrowth": regrowth.updates if regrowth else [],
    }
    return PruneResult(mask, model, details, round_masks=masks)
