"""Ballot (docs/ballot.md): rounds of observation and voting at shrinking densities, then refined training.

budget   ``round_counts``: each round's per-layer counts, the mean of ERK's and the one-shot ticket's (the default),
         either alone, or the larger of the two (``layer_budget``), with a floor (no layer is starved).
collect  ``GradientCollector``, a hook of the observation's own training steps, sums the fairness gradient f
         (cross-entropy weighted by the dense model's class weights) and the accuracy gradient g (plain
         cross-entropy), one of them from the step itself and the other by one extra backward pass.
vote     each epoch (a ballot) gives one vote to each layer's largest surviving |w|.
conflict a surviving weight is *contested* when fairness would grow it (w*f < 0) while accuracy would shrink it
         (w*g > 0), with strength -g_hat*f_hat above tau. 'protect' sums its fairness saliency -w*f_hat over the
         ballots and reserves ``protect_fraction`` of each layer's count for the best-protected weights; 'veto'
         bars contested weights from a ballot; 'share' reserves the same fraction for the weights some class leans
         on most (per-class saliency retention, ``ClassShareProbe``); 'none' (default, chosen on validation) votes
         on |w| alone.
select   ``select_mask``: each layer keeps its most-voted weights, ties broken by the final magnitude.

With prune.granularity 'unit' the same rounds vote on whole units (``UnitVoter``): each ballot gives one vote to
each coupled group's units of largest L1 norm (ballot.pruning.units), and each group keeps its most-voted units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ballot import distributed
from ballot.config import BallotConfig
from ballot.errors import MaskError
from ballot.masks import (Mask, blended_shares, density_schedule, erk_shares, larger_shares, magnitude_scores,
                          shared_counts, ticket_shares, top_positions)
from ballot.pruning.base import MethodDetails, PruneContext, PruneResult
from ballot.pruning.class_share import ClassShareProbe
from ballot.pruning.units import UnitGroup, kept_units, select_units, unit_counts, unit_mask, unit_scores
from ballot.train import Batch, StepHook, steps_per_epoch, train


def _unit_rms(t: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` divided by its RMS over the entries selected by ``within`` (all entries when None)."""
    selected = t if within is None else t[within]
    rms = selected.pow(2).mean().sqrt() if selected.numel() else torch.zeros((), device=t.device)
    return t / rms if rms > 0 else torch.zeros_like(t)


def conflict_strength(g: torch.Tensor, f: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
    """-g_hat * f_hat, with g and f scaled to unit RMS over the layer's surviving weights (``within``);
    > 0 where the two gradients disagree in sign."""
    return -_unit_rms(g, within) * _unit_rms(f, within)


def contested(weight: torch.Tensor, g: torch.Tensor, f: torch.Tensor, tau: float,
              within: torch.Tensor | None = None) -> torch.Tensor:
    """Weights the fairness gradient would grow and the accuracy gradient would shrink, with conflict strength
    above ``tau``: a gradient step on the fair loss moves |w| up (w * f < 0) while one on the plain loss moves
    it down (w * g > 0)."""
    return (weight * f < 0) & (weight * g > 0) & (conflict_strength(g, f, within) > tau)


def _top(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` best-scoring allowed entries (fewer when fewer are allowed; ties: earlier first)."""
    ok = allowed.flatten()
    chosen = torch.zeros_like(ok)
    if k > 0:
        chosen[ok] = top_positions(scores.flatten()[ok], k)
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


def tie_broken(votes: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Votes plus |w| / (2 max|w|): below half a vote, so the magnitude only orders entries with equal votes."""
    peak = float(magnitudes.max())
    return votes.double() + magnitudes.double() / (2.0 * peak if peak > 0 else 1.0)


def select_mask(votes: dict[str, torch.Tensor], magnitudes: dict[str, torch.Tensor], counts: dict[str, int],
                protection: dict[str, torch.Tensor] | None = None, protect_fraction: float = 0.0) -> Mask:
    """Each layer's ``counts[name]`` most-voted weights (among equal votes the larger |w| wins), except a share
    ``protect_fraction`` that goes to the weights of highest ``protection`` score (> 0) not already chosen."""
    chosen = {}
    for name, v in votes.items():
        if not bool(torch.isfinite(magnitudes[name]).all()):
            raise MaskError(f"'{name}': the observer's weights are not finite (its training diverged), so they "
                            "cannot order the votes")
        combined = tie_broken(v, magnitudes[name])
        everyone = torch.ones_like(v, dtype=torch.bool)
        k = counts[name]
        if protection is None or protect_fraction == 0:
            chosen[name] = cast_ballot(combined, everyone, k)
        else:
            score = protection[name]
            chosen[name] = cast_ballot(combined, everyone, k, score, score > 0, round(protect_fraction * k))
    return Mask(chosen)


GRADIENT_RULES = ("protect", "veto")  # the conflict rules that compare g and f (one extra backward per collected step)
PROTECTING_RULES = ("protect", "share")  # the rules that reserve a share of each layer's count at selection
# layer_budget -> each layer's unscaled density at a round's density
# (called with shapes, scores, density, floor, min_per_layer)
LAYER_SHARES: dict[str, Callable[..., dict[str, float]]] = {
    "blend": blended_shares,
    "erk": lambda shapes, scores, density, floor, min_per_layer: erk_shares(shapes),
    "ticket": lambda shapes, scores, density, floor, min_per_layer: ticket_shares(scores, density),
    "max": larger_shares,
}


class GradientCollector(StepHook):
    """A training-step hook summing g and f over a ballot period and casting a ballot at its end ('share': it
    measures the class shares on ``probe`` at each ballot instead)."""

    def __init__(self, model: nn.Module, candidate: Mask, counts: dict[str, int], class_weights: torch.Tensor,
                 cfg: BallotConfig, period: int, probe: ClassShareProbe | None = None) -> None:
        params = dict(model.named_parameters())
        self.model, self.probe = model, probe
        self.cfg, self.period, self.counts, self.class_weights = cfg, period, counts, class_weights
        self.fair_steps = cfg.obs_loss == "fair"  # the training step's own gradient is f (else g)
        self.names = list(candidate)
        self.params = [params[n] for n in self.names]
        self.candidate = {n: candidate[n].to(self.params[0].device) for n in self.names}
        self.g = [torch.zeros_like(p) for p in self.params]
        self.f = [torch.zeros_like(p) for p in self.params]
        self.votes = {n: torch.zeros(p.shape, dtype=torch.int32) for n, p in zip(self.names, self.params)}
        # summed over ballots: 'protect', the fairness saliency -w*f_hat of a weight on the ballots where it was
        # contested; 'share', its class share
        self.protection = {n: torch.zeros(p.shape) for n, p in zip(self.names, self.params)}
        self.history: list[dict[str, Any]] = []
        self._collecting = False
        self._other: tuple[torch.Tensor, ...] = ()  # the extra backward's gradient of the current step
        self._collected = 0  # steps of the current period whose gradients were collected
        self._steps = 0  # steps of the current period

    def before_backward(self, step: int, batch: Batch) -> None:
        """On a collected step, the gradient of the loss the step does not train on, by one extra backward (this
        process's share of it: the shares are summed over the processes once per ballot, in ``cast``)."""
        self._collecting = step % self.cfg.collect_every == 0
        if self._collecting and self.cfg.conflict in GRADIENT_RULES:
            self._other = batch.gradient(self.params, None if self.fair_steps else self.class_weights)

    def after_backward(self, step: int) -> None:
        """Count the step, and add its gradient and the extra one where a rule compares them, unless a
        mixed-precision overflow made it non-finite."""
        self._steps += 1
        grads = [p.grad for p in self.params] + list(self._other)
        if self._collecting and all(bool(torch.isfinite(grad).all()) for grad in grads):
            if self.cfg.conflict in GRADIENT_RULES:  # 'none' and 'share' never read g or f
                for acc, p in zip(self.f if self.fair_steps else self.g, self.params):
                    acc.add_(p.grad)
            for acc, grad in zip(self.g if self.fair_steps else self.f, self._other):
                acc.add_(grad)
            self._collected += 1
        self._other = ()

    def after_step(self, step: int) -> None:
        """At the end of a period, a ballot on the weights the period's last update left."""
        if (step + 1) % self.period == 0:
            self.cast(step + 1)

    def finish(self, steps: int) -> None:
        """Cast a ballot at the end of the last, incomplete period, if there is one."""
        self.cast(steps)

    @torch.no_grad()
    def cast(self, step: int) -> None:
        """Vote, with the period's summed gradients deciding the contested weights where a rule compares them (a
        period shorter than ``collect_every`` may have collected none: then no weight is contested), and start a
        new period. Every period with a step casts a ballot."""
        if self._steps == 0:
            return
        cfg = self.cfg
        compare = cfg.conflict in GRADIENT_RULES and self._collected > 0
        if compare:
            for acc in self.g if self.fair_steps else self.f:
                distributed.all_reduce_sum(acc)
        if self.probe is not None:  # the same probe on every process; rank 0's shares decide
            shares = [distributed.broadcast(s) for s in
                      self.probe.shares(self.model, self.params, [self.candidate[n] for n in self.names])]
            for name, share in zip(self.names, shares):
                self.protection[name] += share.cpu()
        conflicts, vetoed = {}, 0  # vetoed: votes magnitude alone would have cast that the ballot did not
        for name, p, g, f in zip(self.names, self.params, self.g, self.f):
            within, w, k = self.candidate[name], p.detach(), self.counts[name]
            scores = w.abs()
            disputed = (contested(w, g, f, cfg.conflict_threshold, within) & within if compare
                        else torch.zeros_like(within))
            plain = cast_ballot(scores, within, k)
            ballot = cast_ballot(scores, within & ~disputed, k) if cfg.conflict == "veto" else plain
            if cfg.conflict == "protect":
                self.protection[name] += (-w * _unit_rms(f, within)).clamp(min=0).mul(disputed).cpu()
            self.votes[name] += ballot.int().cpu()
            conflicts[name] = int(disputed.sum())
            vetoed += int((plain & ~ballot).sum())
        self.history.append({"ballot": len(self.history) + 1, "step": step, "conflicts": sum(conflicts.values()),
                             "conflicts_per_layer": conflicts, "votes_vetoed": vetoed})
        for acc in self.g + self.f:
            acc.zero_()
        self._collected = self._steps = 0


class UnitVoter(StepHook):
    """Unit-granularity ballots: every ``period`` steps, one vote to each group's ``counts`` surviving units of
    largest L1 norm."""

    def __init__(self, model: nn.Module, groups: list[UnitGroup], candidate: dict[str, torch.Tensor],
                 counts: dict[str, int], period: int) -> None:
        self.model, self.groups, self.candidate, self.counts, self.period = model, groups, candidate, counts, period
        self.votes = {g.name: torch.zeros(g.size, dtype=torch.int32) for g in groups}
        self.ballots, self.steps = 0, 0

    def before_backward(self, step: int, batch: Batch) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        self.steps = step + 1
        if self.steps % self.period == 0:
            self.cast()

    def finish(self) -> None:
        """Cast a ballot on the last, incomplete period."""
        if self.steps % self.period:
            self.cast()

    @torch.no_grad()
    def cast(self) -> None:
        for name, score in unit_scores(self.model, self.groups).items():
            self.votes[name] += _top(score, self.candidate[name], self.counts[name]).int()
        self.ballots += 1


@dataclass
class BallotRound:
    density: float
    kept: int
    protected: int = 0  # weights 'protect' or 'share' placed beyond the most-voted ones
    ballots: list[dict[str, Any]] = field(default_factory=list)  # GradientCollector.history (round 1 casts none)


@dataclass
class BallotDetails(MethodDetails):
    rounds: list[BallotRound]
    class_weights: list[float]  # the dense model's class weights w_c (fair loss, protection)
    layer_counts: dict[str, int]
    overlap_with_magnitude_ticket: float  # share of the kept weights the one-shot magnitude mask also keeps
    observe_seconds: float
    refine_seconds: float  # every competing final training (refine_start 'best', refine_guard)


@dataclass
class UnitBallotRound:
    density: float
    units: dict[str, int]  # units kept per group
    ballots: int = 0


@dataclass
class UnitBallotDetails(MethodDetails):
    rounds: list[UnitBallotRound]
    units_kept: dict[str, int]
    class_weights: list[float]
    observe_seconds: float
    refine_seconds: float
    granularity: str = "unit"


def _rounded(weights: torch.Tensor) -> list[float]:
    return [round(float(w), 4) for w in weights]


def prune_units(ctx: PruneContext) -> PruneResult:
    """Ballot over whole units: round 1 keeps each group's units of largest L1 norm in theta_T, every further round
    trains the current units from theta_k (``obs_epochs``) and keeps the most-voted ones (ties: the final L1 norm);
    then the final training of theta_T's surviving units (removing whole units destroys what rewinding relies on:
    on validation, fine-tuning theta_T beat rewinding to theta_k). The unit sets are nested across rounds."""
    cfg, started = ctx.config.ballot, time.perf_counter()
    trained, groups = ctx.model_from(ctx.dense.trained_state), ctx.unit_groups
    counts = [unit_counts(trained, groups, d) for d in density_schedule(ctx.density, cfg.rounds)]
    keep = select_units(unit_scores(trained, groups), counts[0])
    mask = unit_mask(trained, groups, keep)
    rounds = [UnitBallotRound(mask.density(), kept_units(mask, groups))]
    per_epoch = steps_per_epoch(len(ctx.data.train), ctx.config.retrain.batch_size)
    masks, votes = [mask], {}
    for number, wanted in enumerate(counts[1:], start=2):
        observer = ctx.model_from(ctx.dense.rewind_state)
        voter = UnitVoter(observer, groups, keep, wanted, cfg.ballot_every or per_epoch)
        train(observer, ctx.data.train, ctx.config.observation(), seed=ctx.seed, mask=mask, device=ctx.device,
              hook=voter, desc=f"ballot round {number}", progress=ctx.progress,
              class_weights=ctx.dense_class_weights if cfg.obs_loss == "fair" else None)
        voter.finish()
        votes, final = voter.votes, unit_scores(observer, groups)
        keep = select_units({n: tie_broken(votes[n], final[n]) for n in final}, wanted)
        mask = ctx.agree(unit_mask(observer, groups, keep), f"ballot round {number}")
        masks.append(mask)
        rounds.append(UnitBallotRound(mask.density(), kept_units(mask, groups), voter.ballots))
    observe_seconds = time.perf_counter() - started
    model = ctx.model_from(ctx.dense.trained_state)  # fine-tuned, not rewound: docs/deploy.md, "Structured Ballot"
    result = ctx.final_train(model, mask, "ballot refine")
    details = UnitBallotDetails(rounds, kept_units(mask, groups), _rounded(ctx.dense_class_weights), observe_seconds,
                                result.seconds)
    return PruneResult(mask, model, details, history=result.history,
                       tensors={"votes": votes} if votes else {}, round_masks=masks, final_choice=result.final_choice)


def round_counts(ctx: PruneContext, scores: dict[str, torch.Tensor]) -> list[dict[str, int]]:
    """Per-layer kept counts of each round at the round's density, each within the previous one so the masks can
    be nested: with ``layer_budget`` 'erk' ERK shares, with 'ticket' each layer's share of the global top-k of
    ``scores`` (theta_T's |w|), with 'blend' the mean of the two densities, with 'max' the larger; every layer keeps
    at least ``layer_floor`` x its uniform share."""
    cfg = ctx.config.ballot
    shapes = {name: tuple(t.shape) for name, t in scores.items()}
    counts: list[dict[str, int]] = []
    for density in density_schedule(ctx.density, cfg.rounds):
        shares = LAYER_SHARES[cfg.layer_budget](shapes, scores, density, cfg.layer_floor, ctx.config.min_per_layer)
        counts.append(shared_counts(shapes, shares, density, cfg.layer_floor, ctx.config.min_per_layer,
                                    capacity=counts[-1] if counts else None))
    return counts


def observe(ctx: PruneContext, mask: Mask, counts: dict[str, int], desc: str
            ) -> tuple[Mask, GradientCollector, int]:
    """Train ``mask`` from theta_k (prune.retrain, ``obs_epochs``), casting a ballot each period; the next mask is
    each layer's ``counts`` most-voted survivors (with 'protect' or 'share', a share goes to the best-protected
    ones). Returns it, the collector, and how many of its weights protection put there."""
    cfg = ctx.config.ballot
    observer = ctx.model_from(ctx.dense.rewind_state)
    per_epoch = steps_per_epoch(len(ctx.data.train), ctx.config.retrain.batch_size)
    probe = (ClassShareProbe(ctx.data.train, ctx.data.num_classes, cfg.share_samples, ctx.seed)
             if cfg.conflict == "share" else None)
    collector = GradientCollector(observer, mask, counts, ctx.dense_class_weights, cfg, cfg.ballot_every or per_epoch,
                                  probe)
    run = train(observer, ctx.data.train, ctx.config.observation(), seed=ctx.seed, mask=mask, device=ctx.device,
                hook=collector, class_weights=ctx.dense_class_weights if cfg.obs_loss == "fair" else None, desc=desc,
                progress=ctx.progress)
    collector.finish(run.steps)
    magnitudes = magnitude_scores(observer, list(mask))
    by_votes = select_mask(collector.votes, magnitudes, counts)
    if cfg.conflict not in PROTECTING_RULES:
        return ctx.agree(by_votes, desc), collector, 0
    selected = select_mask(collector.votes, magnitudes, counts, collector.protection, cfg.protect_fraction)
    return ctx.agree(selected, desc), collector, sum(int((selected[n] & ~by_votes[n]).sum()) for n in selected)


def prune(ctx: PruneContext) -> PruneResult:
    """Rounds of observation and voting at shrinking densities, then rewind and the final training (ctx.train_rewound).

    Round 1 keeps each layer's largest weights of theta_T (its ``layer_budget`` count at density ** (1 / rounds)); every
    further round trains the current mask from theta_k and keeps the most-voted survivors at the next density of
    the schedule, so the masks are nested and the last one has exactly the target density.
    """
    if ctx.config.granularity == "unit":
        return prune_units(ctx)
    started = time.perf_counter()
    trained = ctx.model_from(ctx.dense.trained_state)
    scores = magnitude_scores(trained)
    counts = round_counts(ctx, scores)
    mask = Mask.top_k_per_layer(scores, counts[0])
    rounds = [BallotRound(mask.density(), mask.kept)]
    masks, votes = [mask], {}
    for number, kept in enumerate(counts[1:], start=2):
        mask, collector, protected = observe(ctx, mask, kept, f"ballot round {number}")
        masks.append(mask)
        votes = collector.votes
        rounds.append(BallotRound(mask.density(), mask.kept, protected, collector.history))
    observe_seconds = time.perf_counter() - started

    model, result = ctx.train_rewound(mask, "ballot refine")
    ticket = Mask.top_k(scores, ctx.density, ctx.config.min_per_layer)
    overlap = sum(int((ticket[n] & mask[n]).sum()) for n in mask) / mask.kept
    details = BallotDetails(rounds, _rounded(ctx.dense_class_weights), mask.counts(), overlap, observe_seconds,
                            result.seconds)
    return PruneResult(mask, model, details, history=result.history, tensors={"votes": votes} if votes else {},
                       round_masks=masks, final_choice=result.final_choice)
