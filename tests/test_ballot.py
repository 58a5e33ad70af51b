import math

import pytest
import torch

from ballot.config import LAYER_BUDGETS
from ballot.errors import MaskError
from ballot.experiment import run_prune
from ballot.masks import (Mask, blended_shares, budget, density_schedule, larger_shares, magnitude_scores,
                          shared_counts, ticket_shares)
from ballot.models import build_model
from ballot.pruning import PruneContext
from ballot.pruning import ballot as ballot_module
from ballot.pruning.ballot import (LAYER_SHARES, cast_ballot, conflict_strength, contested, round_counts,
                                    select_mask)
from tests.conftest import tiny_config


def _hand_built_layer():
    """Six weights by decreasing magnitude. The fairness gradient would grow weight 5 (w * f < 0) while the
    accuracy gradient would shrink it (w * g > 0); weight 0 is pulled the other way round (accuracy grows it)."""
    w = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    g = torch.tensor([-1.0, 0.2, 0.2, 0.2, 0.2, 2.0])
    f = torch.tensor([1.0, 0.2, 0.2, 0.2, 0.2, -2.0])
    return w, g, f


def test_contested_weights_are_those_fairness_grows_and_accuracy_shrinks():
    w, g, f = _hand_built_layer()
    strength = conflict_strength(g, f)
    assert strength[0] > 0 and strength[5] > 0 and (strength[1:5] < 0).all()  # both 0 and 5 disagree in sign
    assert contested(w, g, f, tau=0.0).tolist() == [False, False, False, False, False, True]


def test_threshold_decides_which_conflicts_count():
    w, g, f = _hand_built_layer()
    strength = float(conflict_strength(g, f)[5])
    assert contested(w, g, f, tau=strength - 1e-3)[5]
    assert not contested(w, g, f, tau=strength + 1e-3).any()


def test_conflict_strength_is_scale_free_per_layer():
    _, g, f = _hand_built_layer()
    assert torch.allclose(conflict_strength(g, f), conflict_strength(100 * g, 0.01 * f))


def test_protected_weight_survives_where_magnitude_alone_drops_it():
    w, g, f = _hand_built_layer()
    everyone = torch.ones(6, dtype=torch.bool)
    disputed = contested(w, g, f, 0.0)
    plain = cast_ballot(w.abs(), everyone, k=3)
    assert plain.tolist() == [True, True, True, False, False, False]
    protected = cast_ballot(w.abs(), everyone, 3, protected_scores=-w * f, protectable=disputed, protect=1)
    assert protected.tolist() == [True, True, False, False, False, True]  # weight 5 replaces the weakest vote
    vetoed = cast_ballot(w.abs(), everyone & ~disputed, k=3)
    assert vetoed.tolist() == plain.tolist()  # weight 5 was not in the top 3 anyway


def test_unused_protected_votes_go_back_to_magnitude():
    w, g, f = _hand_built_layer()
    everyone = torch.ones(6, dtype=torch.bool)
    nobody = torch.zeros(6, dtype=torch.bool)
    assert cast_ballot(w.abs(), everyone, 3, -w * f, nobody, protect=2).tolist() == [True] * 3 + [False] * 3


def test_veto_bars_contested_weights():
    w, g, f = _hand_built_layer()
    disputed = contested(w, f, g, 0.0)  # roles swapped: now weight 0 is the contested one
    assert disputed.tolist() == [True] + [False] * 5
    assert cast_ballot(w.abs(), ~disputed, k=3).tolist() == [False, True, True, True, False, False]


def test_veto_run_bars_contested_weights_from_its_ballots(tiny_data, tiny_dense):
    plain = run_prune(tiny_config("prune.ballot.rounds=2"), tiny_data, tiny_dense)
    vetoed = run_prune(tiny_config("prune.ballot.rounds=2", "prune.ballot.conflict=veto",
                                   "prune.ballot.conflict_threshold=0"), tiny_data, tiny_dense)
    ballots = vetoed.details.rounds[1].ballots
    assert sum(b["conflicts"] for b in ballots) > 0
    assert sum(b["votes_vetoed"] for b in ballots) > 0, "a vetoed vote goes to another weight"
    assert vetoed.mask.kept == plain.mask.kept and vetoed.mask.to_bytes() != plain.mask.to_bytes()


def test_votes_vetoed_counts_every_vote_magnitude_would_have_cast_and_the_ballot_did_not():
    """Weights 1 and 5 of six contested. With k = 3, weight 1's vote goes to weight 3 (weight 5 never had one): one
    vote vetoed. With k = 6 both votes go nowhere: two vetoed, four cast."""
    from ballot.config import BallotConfig
    from ballot.pruning.ballot import GradientCollector

    w, g, f = _hand_built_layer()
    g[1], f[1] = 2.0, -2.0  # weight 1 contested too
    layer = torch.nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w.view(1, 6))
    for k, cast in ((3, 3), (6, 4)):
        collector = GradientCollector(layer, Mask({"weight": torch.ones(1, 6, dtype=torch.bool)}), {"weight": k},
                                      torch.ones(2), BallotConfig(conflict="veto", conflict_threshold=0.0), period=1)
        collector.g[0].copy_(g.view(1, 6))
        collector.f[0].copy_(f.view(1, 6))
        collector._collected = collector._steps = 1
        collector.cast(1)
        assert int(collector.votes["weight"].sum()) == cast
        assert collector.history[-1]["conflicts"] == 2 and collector.history[-1]["votes_vetoed"] == (1 if k == 3
                                                                                                       else 2)


def test_select_mask_prefers_votes_then_magnitude_per_layer():
    votes = {"w": torch.tensor([3, 3, 1, 0], dtype=torch.int32), "v": torch.tensor([0, 1], dtype=torch.int32)}
    magnitudes = {"w": torch.tensor([0.1, 0.9, 5.0, 9.0]), "v": torch.tensor([7.0, 0.1])}
    mask = select_mask(votes, magnitudes, {"w": 2, "v": 1})
    assert mask["w"].tolist() == [True, True, False, False] and mask["v"].tolist() == [False, True]
    tie = select_mask({"w": torch.tensor([1, 1, 1, 0], dtype=torch.int32)}, {"w": magnitudes["w"]}, {"w": 2})
    assert tie["w"].tolist() == [False, True, True, False]


def test_protection_reserves_its_share_of_the_layer_at_selection():
    votes = {"w": torch.tensor([5, 5, 5, 1, 0, 0], dtype=torch.int32)}
    magnitudes = {"w": torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])}
    protection = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 2.0])}
    assert select_mask(votes, magnitudes, {"w": 3})["w"].tolist() == [True, True, True, False, False, False]
    protected = select_mask(votes, magnitudes, {"w": 3}, protection, protect_fraction=1 / 3)
    assert protected["w"].tolist() == [True, True, False, False, False, True]


_MODELS = [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32)), ("vgg", (3, 32, 32)), ("mobilenet", (3, 32, 32)),
           ("vit", (1, 28, 28))]


def _init_magnitudes(model_name, shape):
    """|w| at initialisation: the layers of large fan-in hold the smallest weights."""
    torch.manual_seed(0)
    return magnitude_scores(build_model(model_name, shape, 10))


@pytest.mark.parametrize("model_name,shape", _MODELS)
@pytest.mark.parametrize("density", [0.05, 0.02])
def test_without_the_floor_the_ticket_rule_starves_a_layer(model_name, shape, density):
    """The premise of the next test: the global top-k leaves some layer below half its uniform share."""
    scores = _init_magnitudes(model_name, shape)
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    unfloored = shared_counts(shapes, ticket_shares(scores, density), density, floor=0.0)
    assert any(unfloored[n] < 0.5 * density * scores[n].numel() for n in shapes)


@pytest.mark.parametrize("model_name,shape,density,rule", [
    pytest.param(m, shape, d, rule, id=f"{m}-{d}-{rule}")
    for m, shape in [*_MODELS, ("lstm", (1, 28, 28))] for d in (0.05, 0.02) for rule in LAYER_BUDGETS])
def test_ballot_layer_budgets_keep_every_layer_above_half_its_uniform_share(model_name, shape, density, rule):
    """Ballot's own budget (round_counts: the rule's shares, floors, nested rounds) keeps every layer of every
    round at layer_floor (0.5) x its uniform share."""
    scores = _init_magnitudes(model_name, shape)
    cfg = tiny_config(f"prune.ballot.layer_budget={rule}", "prune.ballot.rounds=3")
    ctx = PruneContext(data=None, model_name=model_name, density=density, seed=0, dense=None, config=cfg.prune)
    rounds = round_counts(ctx, scores)
    assert len(rounds) == 3
    for d, counts in zip(density_schedule(density, 3), rounds):
        assert sum(counts.values()) == budget(sum(s.numel() for s in scores.values()), d)
        for name, count in counts.items():
            assert count >= math.floor(0.5 * d * scores[name].numel()), f"{name} starved at density {d}"


def test_ballot_meets_the_density_with_nested_rounds_and_zero_pruned_weights(tiny_data, tiny_dense):
    result = run_prune(tiny_config("prune.ballot.rounds=3", "base.density=0.05"), tiny_data, tiny_dense)
    assert result.mask.kept == budget(result.mask.total, 0.05)
    masks = result.round_masks
    assert [m.kept for m in masks] == [budget(result.mask.total, d) for d in density_schedule(0.05, 3)]
    assert masks[2].is_subset_of(masks[1]) and masks[1].is_subset_of(masks[0])
    assert masks[-1].to_bytes() == result.mask.to_bytes()
    params = dict(result.model.named_parameters())
    assert all(torch.count_nonzero(params[n][~keep]) == 0 for n, keep in result.mask.items())


def test_ticket_budget_keeps_the_density_nested_and_follows_theta_t_where_erk_does_not(tiny_data, tiny_dense):
    result = run_prune(tiny_config("prune.ballot.layer_budget=ticket", "base.density=0.05"), tiny_data, tiny_dense)
    masks = result.round_masks
    assert [m.kept for m in masks] == [budget(result.mask.total, d) for d in density_schedule(0.05, len(masks))]
    assert all(inner.is_subset_of(outer) for inner, outer in zip(masks[1:], masks))
    trained = {n: tiny_dense.trained_state[n].abs() for n in result.mask}
    first_ticket = Mask.top_k(trained, masks[0].density())  # round 1 at its density, no floor binding here
    assert masks[0].counts() == first_ticket.counts()
    erk = run_prune(tiny_config("prune.ballot.layer_budget=erk", "base.density=0.05"), tiny_data, tiny_dense)
    assert erk.round_masks[0].counts() != masks[0].counts()


def test_every_observation_round_starts_from_theta_k(tiny_data, tiny_dense, monkeypatch):
    starts = []

    def recording_train(model, *args, **kwargs):
        starts.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        return real_train(model, *args, **kwargs)

    real_train = ballot_module.train
    monkeypatch.setattr(ballot_module, "train", recording_train)
    result = run_prune(tiny_config("prune.ballot.rounds=3"), tiny_data, tiny_dense)
    assert len(starts) == 2 and len(result.round_masks) == 3
    rewind = tiny_dense.rewind_state
    assert all(torch.equal(start[n], rewind[n].to(start[n].device)) for start in starts for n in start)


def test_every_configurable_budget_rule_has_shares_and_no_other():
    assert sorted(LAYER_SHARES) == sorted(LAYER_BUDGETS)


@pytest.mark.parametrize("layer_budget, combined_shares", [("max", larger_shares), ("blend", blended_shares)])
def test_combined_budgets_share_each_layer_between_erk_and_the_ticket_within_the_budget(layer_budget, combined_shares,
                                                                                        tiny_data, tiny_dense):
    result = run_prune(tiny_config(f"prune.ballot.layer_budget={layer_budget}", "base.density=0.05"), tiny_data,
                       tiny_dense)
    masks = result.round_masks
    assert all(inner.is_subset_of(outer) for inner, outer in zip(masks[1:], masks))
    assert result.mask.kept == budget(result.mask.total, 0.05)
    trained = {n: tiny_dense.trained_state[n].abs() for n in result.mask}
    shapes = {n: tuple(t.shape) for n, t in trained.items()}
    density = masks[0].density()
    assert masks[0].counts() == shared_counts(shapes, combined_shares(shapes, trained, density, 0.5), density, 0.5)


def test_same_seed_same_mask(tiny_data, tiny_dense):
    first = run_prune(tiny_config(), tiny_data, tiny_dense)
    second = run_prune(tiny_config(), tiny_data, tiny_dense)
    assert first.mask.to_bytes() == second.mask.to_bytes()


def test_votes_history_and_ballot_period(tiny_data, tiny_dense):
    result = run_prune(tiny_config("prune.ballot.ballot_every=5", "prune.ballot.rounds=2"), tiny_data, tiny_dense)
    steps_per_epoch = math.ceil(len(tiny_data.train) / 64)
    total = 2 * steps_per_epoch  # obs_epochs = 2 in the tiny configuration
    full = [5 * (i + 1) for i in range(total // 5)]
    ballots = result.details.rounds[1].ballots
    assert [b["step"] for b in ballots] == full + ([total] if total % 5 else []), "a leftover period votes too"
    votes = result.tensors["votes"]
    # each ballot gives each layer exactly its round count of votes (the last round's: the final mask's)
    assert {n: int(v.sum()) for n, v in votes.items()} == {n: len(ballots) * k for n, k in result.mask.counts().items()}
    assert max(int(v.max()) for v in votes.values()) == len(ballots), "a weight kept in every ballot"


def test_each_ballot_votes_on_the_weights_its_periods_last_update_left(tiny_data, tiny_dense, monkeypatch):
    """With a ballot every step, the first ballot ranks the weights after one update, never theta_k itself."""
    seen = []

    class Recording(ballot_module.GradientCollector):
        def cast(self, step):
            before = {n: v.clone() for n, v in self.votes.items()}
            weights = {n: p.detach().clone() for n, p in zip(self.names, self.params)}
            super().cast(step)
            seen.append((weights, {n: (self.votes[n] - before[n]).bool() for n in self.votes}))

    monkeypatch.setattr(ballot_module, "GradientCollector", Recording)
    run_prune(tiny_config("prune.ballot.ballot_every=1", "prune.ballot.rounds=2"), tiny_data, tiny_dense)
    weights, votes = seen[0]
    rewind = {n: tiny_dense.rewind_state[n] for n in weights}
    assert not any(torch.equal(weights[n][votes[n]], rewind[n][votes[n]]) for n in weights), "voted on theta_k"
    for name, voted in votes.items():  # and the votes are that state's largest survivors
        assert weights[name][voted].abs().min() >= weights[name][~voted].abs().max()


@pytest.mark.parametrize("conflict", ["none", "protect"])
def test_every_period_votes_even_one_shorter_than_collect_every(tiny_data, tiny_dense, conflict):
    """Gradients are collected on every 4th step; a ballot every step must still vote every step."""
    result = run_prune(tiny_config("prune.ballot.ballot_every=1", "prune.ballot.rounds=2",
                                   f"prune.ballot.conflict={conflict}"), tiny_data, tiny_dense)
    total = 2 * math.ceil(len(tiny_data.train) / 64)
    ballots = result.details.rounds[1].ballots
    assert [b["step"] for b in ballots] == list(range(1, total + 1))
    assert max(int(v.max()) for v in result.tensors["votes"].values()) == total, "a weight kept in every ballot"


def test_pruned_weights_stay_zero_through_refined_training_with_plateau(tiny_data, tiny_dense):
    cfg = tiny_config("prune.ballot.refine_train.schedule=plateau", "prune.ballot.refine_train.epochs=3")
    result = run_prune(cfg, tiny_data, tiny_dense)
    params = dict(result.model.named_parameters())
    assert all(torch.count_nonzero(params[n][~keep]) == 0 for n, keep in result.mask.items())
    assert len(result.history) == 3 and all("val_metric" in r for r in result.history)


def test_on_epoch_sees_validation_metrics_and_can_stop_the_run(tiny_data, tiny_dense):
    seen = []

    class Stop(Exception):
        pass

    def on_epoch(epoch, metrics):
        seen.append((epoch, metrics["acc"]))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        run_prune(tiny_config("prune.ballot.refine_train.epochs=5"), tiny_data, tiny_dense, on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2] and all(0 <= a <= 1 for _, a in seen)


@pytest.mark.parametrize("model_name", ["cnn", "resnet20"])
@pytest.mark.parametrize("layer_budget", ["erk", "ticket", "max", "blend"])
def test_no_layer_of_a_convolutional_ballot_mask_falls_below_its_floor(model_name, layer_budget, tiny_data):
    from ballot.experiment import train_dense

    cfg = tiny_config(f"base.model={model_name}", "base.density=0.02", "train_dense.epochs=1",
                      "prune.ballot.obs_epochs=1", "prune.ballot.refine_train.epochs=1",
                      f"prune.ballot.layer_budget={layer_budget}")
    _, dense, _ = train_dense(cfg, tiny_data, progress=False)
    result = run_prune(cfg, tiny_data, dense)
    assert result.mask.kept == budget(result.mask.total, 0.02)
    for layer in result.mask.report():
        assert layer.kept >= math.floor(0.5 * 0.02 * layer.total), f"{layer.name} starved: {layer.kept}/{layer.total}"


def test_protection_puts_contested_weights_into_the_mask_when_classes_are_served_unequally(monkeypatch):
    from ballot.experiment import prepare_data, train_dense

    collectors = []

    class Recording(ballot_module.GradientCollector):
        """Notes, before each ballot, which surviving weights the period's summed g and f contest."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ever_contested = {n: torch.zeros_like(c) for n, c in self.candidate.items()}
            collectors.append(self)

        def cast(self, step):
            for name, p, g, f in zip(self.names, self.params, self.g, self.f):
                within = self.candidate[name]
                self.ever_contested[name] |= contested(p.detach(), g, f, self.cfg.conflict_threshold, within) & within
            super().cast(step)

    cfg = tiny_config("data.imbalance_ratio=10", "prune.ballot.rounds=2")
    data = prepare_data(cfg)
    _, dense, _ = train_dense(cfg, data, progress=False)
    plain = run_prune(cfg, data, dense)
    monkeypatch.setattr(ballot_module, "GradientCollector", Recording)
    protected = run_prune(tiny_config("data.imbalance_ratio=10", "prune.ballot.rounds=2",
                                      "prune.ballot.conflict=protect", "prune.ballot.conflict_threshold=0"), data, dense)
    assert len(set(round(float(w), 4) for w in protected.details.class_weights)) > 1
    assert plain.details.rounds[1].protected == 0
    moved = protected.details.rounds[1].protected
    assert 0 < moved <= round(0.2 * protected.mask.kept) + len(protected.mask)
    assert protected.mask.kept == plain.mask.kept and protected.mask.to_bytes() != plain.mask.to_bytes()
    # only contested weights earn protection (select_mask protects scores > 0 only), so only they can move in
    (collector,) = collectors
    for name, score in collector.protection.items():
        assert not (score > 0)[~collector.ever_contested[name].cpu()].any(), f"{name}: uncontested weight protected"
    assert any((score > 0).any() for score in collector.protection.values())


def _two_class_probe():
    """A bias-free linear classifier 3 -> 2: class 0 reads inputs 0 and 1 through large weights, class 1 only input
    2 through one small weight, so magnitude ranks that weight last of the live ones."""
    from ballot.data import Split
    from ballot.pruning.class_share import ClassShareProbe

    model = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[5.0, 4.0, 0.0], [0.0, 0.0, 0.1]]))
    x = torch.tensor([[1.0, 1.0, 0.0]] * 4 + [[0.0, 0.0, 1.0]] * 4)
    y = torch.tensor([0] * 4 + [1] * 4)
    return model, ClassShareProbe(Split(x, y), num_classes=2, per_class=3, seed=0)


def test_class_share_is_each_weights_largest_normalised_class_saliency():
    model, probe = _two_class_probe()
    everyone = torch.ones(2, 3, dtype=torch.bool)
    (share,) = probe.shares(model, [model.weight], [everyone])
    # class 1's whole saliency sits on weight (1, 2); class 0's on (0, 0) and (0, 1) in the ratio 5 : 4 of w * x, and
    # its gradient on row 1 is as large as on row 0 but multiplies zero weights. 6 survivors: an even share is 1/6.
    assert share[1, 2] == pytest.approx(6.0)
    assert share[0, 0] == pytest.approx(6.0 * 5 / 9, rel=1e-4) and share[0, 1] == pytest.approx(6.0 * 4 / 9, rel=1e-4)
    assert share[0, 2] == 0 and share[1, 0] == 0 and share[1, 1] == 0
    assert model.weight.grad is None and model.training  # the probe leaves .grad and the mode alone
    (outside,) = probe.shares(model, [model.weight], [torch.tensor([[True, True, False], [False, False, False]])])
    assert outside[1, 2] == 0 and outside[0, 0] == pytest.approx(2.0 * 5 / 9, rel=1e-4)  # only survivors count


def test_share_protected_weight_survives_where_magnitude_alone_drops_it():
    model, probe = _two_class_probe()
    everyone = torch.ones(2, 3, dtype=torch.bool)
    (share,) = probe.shares(model, [model.weight], [everyone])
    votes = {"w": torch.zeros(2, 3, dtype=torch.int32)}
    magnitudes = {"w": model.weight.detach().abs()}
    plain = select_mask(votes, magnitudes, {"w": 2})["w"]
    assert plain.tolist() == [[True, True, False], [False, False, False]]  # class 1 loses its only weight
    protected = select_mask(votes, magnitudes, {"w": 2}, {"w": share}, protect_fraction=0.5)["w"]
    assert protected.tolist() == [[True, False, False], [False, False, True]]


def test_share_rule_keeps_the_budget_and_moves_the_mask(tiny_data, tiny_dense):
    plain = run_prune(tiny_config("prune.ballot.rounds=2"), tiny_data, tiny_dense)
    shared = run_prune(tiny_config("prune.ballot.rounds=2", "prune.ballot.conflict=share"), tiny_data, tiny_dense)
    again = run_prune(tiny_config("prune.ballot.rounds=2", "prune.ballot.conflict=share"), tiny_data, tiny_dense)
    assert shared.mask.kept == plain.mask.kept == budget(plain.mask.total, tiny_config().base.density)
    assert shared.mask.to_bytes() == again.mask.to_bytes()  # deterministic
    moved = shared.details.rounds[1].protected
    assert 0 < moved <= round(0.2 * shared.mask.kept) + len(shared.mask)
    assert shared.mask.to_bytes() != plain.mask.to_bytes()
    params = dict(shared.model.named_parameters())
    assert all(torch.count_nonzero(params[n][~keep]) == 0 for n, keep in shared.mask.items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_observer_is_refused_rather_than_selected_from(bad):
    votes = {"a": torch.tensor([1, 1, 1], dtype=torch.int32)}
    with pytest.raises(MaskError, match="'a': the observer's weights are not finite"):
        select_mask(votes, {"a": torch.tensor([bad, 1.0, 2.0])}, {"a": 2})
