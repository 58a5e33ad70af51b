import copy
import dataclasses
import json

import pytest
import torch

from ballot.errors import UnknownMethodError
from ballot.experiment import run_prune, save_pruned, train_dense
from ballot.fairness import evaluate, fairness_objective
from ballot.masks import budget
from ballot.pruning import PRUNERS, PruneContext, get_pruner
from ballot.pruning.base import MethodDetails
from ballot.storage import load_tensors
from ballot.train import recalibrate_batchnorm
from tests.conftest import tiny_config


def _flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _val_objective(model: torch.nn.Module, data) -> float:
    """val acc - 0.5 x val MCD, the objective rival final trainings are compared on (objective_mcd_weight 0.5)."""
    return fairness_objective(evaluate(model, data.val.x, data.val.y, data.num_classes), 0.5)


@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize("density", [0.5, 0.1, 0.02])
def test_each_pruner_meets_the_density_exactly_and_keeps_pruned_weights_zero(method, density, tiny_data, tiny_dense):
    cfg = tiny_config(f"prune.method={method}", f"base.density={density}")
    result = run_prune(cfg, tiny_data, tiny_dense)
    assert result.mask.kept == budget(result.mask.total, density)
    params = dict(result.model.named_parameters())
    for name, keep in result.mask.items():
        assert torch.count_nonzero(params[name][~keep]) == 0, f"{method}: pruned weights of {name} moved"
        assert keep.any(), f"{method}: layer {name} died"
    details = result.details.to_json()  # typed per method, JSON-ready as it is written to details.json
    assert isinstance(result.details, MethodDetails) and json.loads(json.dumps(details)) == details


def test_lth_masks_are_nested_across_rounds(tiny_data, tiny_dense):
    result = run_prune(tiny_config("prune.method=lth", "prune.lth_rounds=3", "base.density=0.05"), tiny_data, tiny_dense)
    masks = result.round_masks
    assert len(masks) == 3
    assert masks[0].kept > masks[1].kept > masks[2].kept
    assert masks[2].is_subset_of(masks[1]) and masks[1].is_subset_of(masks[0])
    assert masks[-1].to_bytes() == result.mask.to_bytes()


@pytest.mark.parametrize("method", ["lth", "ballot", "random"])
def test_same_seed_gives_identical_mask_bytes_and_metrics(method, tiny_data, tiny_dense):
    from ballot.experiment import model_metrics

    cfg = tiny_config(f"prune.method={method}")
    first, second = run_prune(cfg, tiny_data, tiny_dense), run_prune(cfg, tiny_data, tiny_dense)
    assert first.mask.to_bytes() == second.mask.to_bytes()
    assert model_metrics(first.model, tiny_data, "cpu") == model_metrics(second.model, tiny_data, "cpu")


def test_random_masks_differ_across_seeds(tiny_data, tiny_dense):
    a = run_prune(tiny_config("prune.method=random", "base.seed=1"), tiny_data, tiny_dense)
    b = run_prune(tiny_config("prune.method=random", "base.seed=2"), tiny_data, tiny_dense)
    assert a.mask.to_bytes() != b.mask.to_bytes()


def test_unknown_method_names_the_choices():
    with pytest.raises(UnknownMethodError, match="unknown pruning method 'bogus'.*ballot"):
        get_pruner("bogus")


def test_final_train_refined_retrains_the_baselines_mask_with_the_refined_schedule(tiny_data, tiny_dense):
    plain = run_prune(tiny_config("prune.method=lth"), tiny_data, tiny_dense)
    refined = run_prune(tiny_config("prune.method=lth", "prune.final_train=refined",
                                    "prune.ballot.refine_train.epochs=3"), tiny_data, tiny_dense)
    assert refined.mask.to_bytes() == plain.mask.to_bytes()  # the same selection ...
    assert len(refined.history) == 3 and len(plain.history) == 2  # ... trained anew
    assert [len(r.history) for r in plain.details.rounds] == [2, 2]


def test_fairness_start_defers_the_class_weights_of_the_refined_training_only(tiny_data, tiny_dense):
    def final_weights(*overrides: str) -> torch.Tensor:
        return _flat_weights(run_prune(tiny_config("prune.method=lth", *overrides), tiny_data, tiny_dense).model)

    refined = ("prune.final_train=refined", "prune.ballot.refine_train.epochs=2")
    assert not torch.equal(final_weights(*refined), final_weights(*refined, "prune.ballot.fairness_start=0.5"))
    assert torch.equal(final_weights(), final_weights("prune.ballot.fairness_start=0.5"))  # plain training: no weights


@pytest.mark.parametrize("method", ["ballot", "lth", "random", "safecompress", "fairscratch"])
def test_refine_start_picks_the_state_the_refined_training_starts_from(method, tiny_data, tiny_dense):
    """A learning rate of 1e-12 leaves the final model at its start, masked: theta_T with refine_start 'trained',
    theta_k with 'rewind' or (Ballot, LTH, random) with a plain final training; the mask is the same either way."""
    def run(*overrides: str):
        still = ("prune.ballot.refine_train.lr=1e-12", "prune.ballot.refine_train.epochs=1",
                 "prune.retrain.lr=1e-12", "prune.retrain.epochs=1")
        return run_prune(tiny_config(f"prune.method={method}", *still, *overrides), tiny_data, tiny_dense)

    def started_from(result, state: dict[str, torch.Tensor]) -> bool:
        params = dict(result.model.named_parameters())
        return all(torch.allclose(params[n], state[n] * result.mask[n], atol=1e-6) for n in result.mask)

    trained = run("prune.final_train=refined", "prune.ballot.refine_start=trained")
    rewound = run("prune.final_train=refined", "prune.ballot.refine_start=rewind")
    assert trained.mask.to_bytes() == rewound.mask.to_bytes()
    assert started_from(trained, tiny_dense.trained_state) and not started_from(trained, tiny_dense.rewind_state)
    assert started_from(rewound, tiny_dense.rewind_state)
    if method in ("ballot", "lth", "random"):  # the others' plain result is their own search's model
        assert started_from(run("prune.final_train=plain", "prune.ballot.refine_start=trained"), tiny_dense.rewind_state)


@pytest.mark.parametrize("overrides", [("prune.method=magnitude",), ("prune.method=ballot", "prune.granularity=unit")])
def test_refine_start_leaves_the_methods_that_start_from_theta_t_alone(overrides, tiny_data, tiny_dense):
    def final(start: str):
        cfg = tiny_config(*overrides, "prune.final_train=refined", f"prune.ballot.refine_start={start}")
        return run_prune(cfg, tiny_data, tiny_dense)

    rewound, trained, best = final("rewind"), final("trained"), final("best")
    assert not tiny_config(*overrides).prune.rewinds()
    assert torch.equal(_flat_weights(rewound.model), _flat_weights(trained.model))
    assert torch.equal(_flat_weights(rewound.model), _flat_weights(best.model))
    assert best.final_choice is None  # nothing to choose from: no second training ran


@pytest.mark.parametrize("method", ["ballot", "lth", "random", pytest.param("safecompress", marks=pytest.mark.slow),
                                    pytest.param("fairscratch", marks=pytest.mark.slow)])  # their searches run 6 times
def test_refine_start_best_keeps_the_start_with_the_higher_validation_objective(method, tiny_data, tiny_dense):
    """'best' trains the refined training from theta_k and from theta_T's survivors, seeded alike, and keeps the one
    whose validation objective is higher: bit for bit the run that started there alone, and the same mask."""
    def run(start: str, *overrides: str):
        cfg = tiny_config(f"prune.method={method}", "prune.final_train=refined", "prune.ballot.refine_train.epochs=1",
                          f"prune.ballot.refine_start={start}", *overrides)
        return run_prune(cfg, tiny_data, tiny_dense)

    def objective(result) -> float:
        return _val_objective(result.model, tiny_data)

    assert tiny_config(f"prune.method={method}").prune.rewinds()
    kept_labels = set()
    # first theta_T's survivors, untrained, against theta_k's (at density 0.9 theta_T's win); then trained, either
    for overrides in [("prune.ballot.refine_train.lr=1e-12", "base.density=0.9"), ()]:
        rewound, trained, best = run("rewind", *overrides), run("trained", *overrides), run("best", *overrides)
        assert best.mask.to_bytes() == rewound.mask.to_bytes() == trained.mask.to_bytes()
        theta_t_wins = objective(trained) > objective(rewound)
        winner, label = (trained, "refined from theta_T") if theta_t_wins else (rewound, "refined from theta_k")
        assert torch.equal(_flat_weights(best.model), _flat_weights(winner.model))
        assert best.final_choice == {"kept": label, "objectives": pytest.approx(
            {"refined from theta_k": objective(rewound), "refined from theta_T": objective(trained)})}
        kept_labels.add(label)
    assert "refined from theta_T" in kept_labels  # the set-up: the first case has theta_T's survivors win


def test_ballot_with_plain_final_training_uses_the_baselines_schedule(tiny_data, tiny_dense):
    result = run_prune(tiny_config("prune.final_train=plain", "prune.retrain.epochs=3"), tiny_data, tiny_dense)
    assert len(result.history) == 3


def test_save_pruned_writes_the_history_and_each_tensor_artifact(tiny_data, tiny_dense, tmp_path):
    cfg = tiny_config("prune.method=ballot")
    result = run_prune(cfg, tiny_data, tiny_dense)
    save_pruned(tmp_path, result, {"acc": 0.5}, cfg, tuned_params={"prune.ballot.obs_epochs": 8})
    assert json.loads((tmp_path / "history.json").read_text()) == result.history and result.history
    votes = load_tensors(tmp_path / "votes.safetensors", "votes")
    assert set(votes) == set(result.tensors["votes"])
    assert all(torch.equal(votes[n], result.tensors["votes"][n]) for n in votes)
    details = json.loads((tmp_path / "details.json").read_text())
    assert "votes" not in details and details["tuned_params"] == {"prune.ballot.obs_epochs": 8}
    assert details["rounds"] == [dataclasses.asdict(r) for r in result.details.rounds]


def test_the_final_model_of_a_batchnorm_network_carries_its_training_split_statistics(tiny_data):
    overrides = ("base.model=resnet20", "prune.method=magnitude", "prune.retrain.epochs=1", "train_dense.epochs=1")
    _, dense, _ = train_dense(tiny_config(*overrides), tiny_data, progress=False)
    stale = run_prune(tiny_config(*overrides, "prune.recalibrate_bn=false"), tiny_data, dense, progress=False).model
    fresh = run_prune(tiny_config(*overrides), tiny_data, dense, progress=False).model
    expected = copy.deepcopy(stale)
    recalibrate_batchnorm(expected, tiny_data.train.x, tiny_config().prune.retrain.batch_size)
    moved = 0
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected.state_dict()[name]), name
        moved += "running_mean" in name and not torch.equal(value, stale.state_dict()[name])
    assert moved > 0


def test_dense_class_weights_shrink_toward_the_average_as_the_prior_grows(tiny_data, tiny_dense):
    def spread(prior_images: float) -> float:
        cfg = tiny_config(f"prune.ballot.class_weight_prior_images={prior_images}")
        ctx = PruneContext(data=tiny_data, model_name=cfg.base.model, density=cfg.base.density, seed=cfg.base.seed,
                           dense=tiny_dense, config=cfg.prune)
        w = ctx.dense_class_weights
        assert w.mean().item() == pytest.approx(1.0)
        return (w.max() / w.min()).item()

    raw, some, overwhelming = spread(0), spread(10), spread(1e9)
    assert raw > some > 1.0  # the tiny dense model is not equally good on every class
    assert overwhelming == pytest.approx(1.0, abs=1e-5)


def test_refine_guard_keeps_the_final_training_with_the_higher_validation_objective(tiny_data, tiny_dense):
    def prune(*overrides: str):  # one refined start, so the guard's plain training is the only rival
        return run_prune(tiny_config("prune.method=ballot", "prune.ballot.refine_start=rewind", *overrides), tiny_data,
                         tiny_dense)

    def objective(result) -> float:
        return _val_objective(result.model, tiny_data)

    guard = "prune.ballot.refine_guard=true"
    for starved, winner in [("prune.ballot.refine_train.lr=1e-7", "plain"), ("prune.retrain.lr=1e-7", "refined")]:
        refined, plain = prune(starved), prune(starved, "prune.final_train=plain")
        assert (objective(plain) > objective(refined)) == (winner == "plain")  # the set-up: one training cannot learn
        guarded = prune(starved, guard)
        assert guarded.mask.to_bytes() == refined.mask.to_bytes()  # the guard changes the training, not the mask
        assert torch.equal(_flat_weights(guarded.model), _flat_weights((plain if winner == "plain" else refined).model))
        record = guarded.final_choice
        assert record["kept"] == winner
        assert record["objectives"] == pytest.approx({"refined": objective(refined), "plain": objective(plain)})
    assert prune("prune.final_train=plain", guard).final_choice is None  # no refined training: nothing to guard


def test_best_start_and_guard_compete_three_ways_with_the_plain_training_from_theta_k(tiny_data, tiny_dense):
    still = ("prune.ballot.refine_train.lr=1e-12", "prune.retrain.lr=1e-12", "base.density=0.9")  # each stays at start
    cfg = tiny_config("prune.method=lth", "prune.final_train=refined", "prune.ballot.refine_start=best",
                      "prune.ballot.refine_guard=true", *still)
    record = run_prune(cfg, tiny_data, tiny_dense).final_choice
    assert list(record["objectives"]) == ["refined from theta_k", "refined from theta_T", "plain"]  # = tie order
    assert record["objectives"]["plain"] == record["objectives"]["refined from theta_k"]  # the guard starts there too
    assert record["objectives"]["refined from theta_T"] > record["objectives"]["refined from theta_k"]
    assert record["kept"] == "refined from theta_T"


@pytest.mark.parametrize("overrides", [
    ("prune.method=ballot",), ("prune.method=ballot", "prune.ballot.refine_start=rewind"),
    ("prune.method=ballot", "prune.ballot.refine_guard=true"), ("prune.method=lth",),
    ("prune.method=magnitude", "prune.final_train=refined"),
])
def test_final_schedules_lists_every_final_training_a_run_trains(overrides, tiny_data, tiny_dense):
    cfg = tiny_config(*overrides, "prune.retrain.epochs=3")  # refined: 2 epochs, plain: 3
    epochs = []
    run_prune(cfg, tiny_data, tiny_dense, progress=False, on_epoch=lambda epoch, _: epochs.append(epoch))
    planned = [schedule.epochs for schedule in cfg.prune.final_schedules()]
    assert epochs == list(range(1, sum(planned) + 1))


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_the_final_choice_reaches_details_json_for_any_method(method, tiny_data, tiny_dense, tmp_path):
    cfg = tiny_config(f"prune.method={method}", "prune.final_train=refined", "prune.ballot.refine_guard=true",
                      "prune.ballot.refine_train.epochs=1", "prune.retrain.epochs=1")
    result = run_prune(cfg, tiny_data, tiny_dense)
    save_pruned(tmp_path, result, {"acc": 0.5}, cfg)
    record = json.loads((tmp_path / "details.json").read_text())["final_choice"]
    starts = {"refined from theta_k", "refined from theta_T"}  # refine_start 'best', the default, for rewinding methods
    rivals = {"plain"} | (starts if cfg.prune.rewinds() else {"refined"})
    assert record == result.final_choice and set(record["objectives"]) == rivals and record["kept"] in rivals
    unguarded = run_prune(tiny_config(f"prune.method={method}", "prune.ballot.refine_start=rewind"), tiny_data,
                          tiny_dense)
    save_pruned(tmp_path, unguarded, {"acc": 0.5}, cfg)
    assert "final_choice" not in json.loads((tmp_path / "details.json").read_text())


def test_refine_guard_scores_a_batchnorm_network_as_it_ships(tiny_data):
    overrides = ("base.model=resnet20", "train_dense.epochs=1", "prune.retrain.epochs=1", "prune.ballot.obs_epochs=1",
                 "prune.ballot.refine_train.epochs=1", "prune.ballot.refine_guard=true")
    _, dense, _ = train_dense(tiny_config(*overrides), tiny_data, progress=False)
    result = run_prune(tiny_config(*overrides), tiny_data, dense, progress=False)
    record = result.final_choice
    shipped = _val_objective(result.model, tiny_data)
    assert record["objectives"][record["kept"]] == pytest.approx(shipped, abs=1e-12)  # recalibrated, then scored
