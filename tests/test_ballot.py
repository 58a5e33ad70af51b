import math

import pytest
import torch

from ballot.experiment import run_prune
from ballot.masks import Mask, budget
from ballot.pruning.ballot import cast_ballot, conflict_strength, importance, select_mask
from tests.conftest import tiny_config


def _hand_built_layer():
    """Six weights; the two largest (0 and 1) get opposing accuracy and fairness gradients."""
    w = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    g = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    f = torch.tensor([-2.0, -1.5, 1.0, 1.0, 1.0, 1.0])
    return w, g, f


def test_conflicting_weights_are_excluded_from_the_ballot():
    w, g, f = _hand_built_layer()
    strength = conflict_strength(g, f, eta=1.0)
    assert (strength[:2] > 0).all() and (strength[2:] < 0).all()
    veto = strength > 0.5
    assert veto.tolist() == [True, True, False, False, False, False]
    ballot = cast_ballot({"w": importance(w, g, f, "magnitude", 1.0)}, {"w": ~veto}, k=3)
    assert ballot["w"].tolist() == [False, False, True, True, True, False]


def test_threshold_decides_which_conflicts_count():
    w, g, f = _hand_built_layer()
    strength = conflict_strength(g, f, eta=1.0)
    # weight 0 conflicts more strongly than weight 1; a threshold between them vetoes only weight 0
    between = float((strength[0] + strength[1]) / 2)
    assert ((strength > between).nonzero().flatten().tolist()) == [0]


def test_conflict_strength_is_scale_free_per_layer():
    _, g, f = _hand_built_layer()
    assert torch.allclose(conflict_strength(g, f, 1.0), conflict_strength(100 * g, 0.01 * f, 1.0))


def test_no_veto_ballot_is_plain_magnitude_top_k():
    torch.manual_seed(0)
    weights = {"a": torch.randn(20, 5), "b": torch.randn(7)}
    magnitudes = {n: w.abs() for n, w in weights.items()}
    everyone = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    ballot = cast_ballot(magnitudes, everyone, k=budget(107, 0.1))
    expected = Mask.top_k(magnitudes, 0.1, min_per_layer=0)
    assert all(torch.equal(ballot[n], expected[n]) for n in weights)


def test_taylor_importance_combines_both_gradients():
    w, g, f = _hand_built_layer()
    rms = lambda t: t / t.pow(2).mean().sqrt()  # noqa: E731
    assert torch.allclose(importance(w, g, f, "taylor", 0.5), (w * (rms(g) + 0.5 * rms(f))).abs())


def test_select_mask_prefers_votes_then_magnitude():
    votes = {"w": torch.tensor([3, 3, 1, 0], dtype=torch.int32)}
    magnitudes = {"w": torch.tensor([0.1, 0.9, 5.0, 9.0])}
    mask = select_mask(votes, magnitudes, 0.5, min_per_layer=0)
    assert mask["w"].tolist() == [True, True, False, False]
    tie = select_mask({"w": torch.tensor([1, 1, 1, 0], dtype=torch.int32)}, magnitudes, 0.5, min_per_layer=0)
    assert tie["w"].tolist() == [False, True, True, False]


def test_no_veto_and_no_fairness_gradient_both_reduce_to_magnitude_voting(tiny_data, tiny_dense):
    no_veto = run_prune(tiny_config("prune.ballot.conflict_threshold=.inf"), tiny_data, tiny_dense)
    no_fairness = run_prune(tiny_config("prune.ballot.fairness_weight=0"), tiny_data, tiny_dense)
    assert no_veto.mask.to_bytes() == no_fairness.mask.to_bytes()
    assert all(b["conflicts"] == 0 for b in no_veto.details["ballots"] + no_fairness.details["ballots"])


def test_veto_changes_the_mask_and_is_recorded(tiny_data, tiny_dense):
    vetoing = run_prune(tiny_config("prune.ballot.conflict_threshold=0"), tiny_data, tiny_dense)
    plain = run_prune(tiny_config("prune.ballot.conflict_threshold=.inf"), tiny_data, tiny_dense)
    ballots = vetoing.details["ballots"]
    assert len(ballots) == 2  # one per observation epoch
    assert all(b["conflicts"] > 0 and b["vetoed_from_top_k"] > 0 for b in ballots)
    assert vetoing.mask.to_bytes() != plain.mask.to_bytes()
    assert vetoing.mask.kept == plain.mask.kept


def test_votes_history_and_ballot_period(tiny_data, tiny_dense):
    result = run_prune(tiny_config("prune.ballot.ballot_every=5"), tiny_data, tiny_dense)
    steps_per_epoch = math.ceil(len(tiny_data.train) / 64)
    total = 2 * steps_per_epoch
    full = [5 * (i + 1) for i in range(total // 5)]
    leftover_collected = any(step % 4 == 0 for step in range(5 * (total // 5), total))  # collect_every = 4
    ballots = result.details["ballots"]
    assert [b["step"] for b in ballots] == full + ([total] if leftover_collected else [])
    votes = result.details["votes"]
    assert max(int(v.max()) for v in votes.values()) <= len(ballots)
    # a weight never voted for by any ballot is kept only to fill the budget, after all voted ones
    voted = sum(int((v > 0).sum()) for v in votes.values())
    kept_unvoted = sum(int((result.mask[n] & (votes[n] == 0)).sum()) for n in votes)
    assert kept_unvoted == max(0, result.mask.kept - voted)


def test_pruned_weights_stay_zero_through_refined_training_with_plateau(tiny_data, tiny_dense):
    cfg = tiny_config("prune.ballot.refine_train.schedule=plateau", "prune.ballot.refine_train.epochs=3")
    result = run_prune(cfg, tiny_data, tiny_dense)
    params = dict(result.model.named_parameters())
    assert all(torch.count_nonzero(params[n][~keep]) == 0 for n, keep in result.mask.items())
    assert all("val_metric" in r for r in result.details["history"])


def test_observation_density_below_target_is_rejected(tiny_data, tiny_dense):
    with pytest.raises(ValueError, match="obs_density"):
        run_prune(tiny_config("prune.ballot.obs_density=0.05"), tiny_data, tiny_dense)


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


def test_taylor_importance_without_fairness_gradient_still_uses_the_accuracy_gradient(tiny_data, tiny_dense):
    result = run_prune(tiny_config("prune.ballot.importance=taylor", "prune.ballot.fairness_weight=0"),
                       tiny_data, tiny_dense)
    first = next(iter(result.mask.values())).flatten()
    kept = int(first.sum())
    assert 0 < kept < first.numel()
    assert not bool(first[:kept].all()), "scores were all zero: the mask degenerated to a prefix"

