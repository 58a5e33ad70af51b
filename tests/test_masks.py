import math

import pytest
import torch
from torch import nn

from ballot.errors import ConfigError, MaskError, StorageError
from ballot.masks import (Mask, blended_shares, budget, density_schedule, erk_counts, larger_shares,
                          magnitude_scores, prunable_names, shared_counts, ticket_shares, top_positions)
from ballot.models import build_model
from ballot.storage import atomic_save_tensors, load_tensors


@pytest.mark.parametrize("density", [0.5, 0.1, 0.02, 1.0])
def test_top_k_keeps_exactly_the_budget(density):
    torch.manual_seed(0)
    scores = {"a": torch.randn(37, 11), "b": torch.randn(5), "c": torch.randn(3, 3, 4)}
    mask = Mask.top_k(scores, density)
    total = 37 * 11 + 5 + 36
    assert mask.kept == budget(total, density) == max(1, round(density * total))


def test_top_k_keeps_the_largest_scores_and_breaks_ties_by_position():
    mask = Mask.top_k({"a": torch.tensor([1.0, 3.0, 3.0, 0.0]), "b": torch.tensor([2.0, 3.0])}, 0.5, min_per_layer=0)
    assert mask["a"].tolist() == [False, True, True, False]
    assert mask["b"].tolist() == [False, True]
    # a budget of 2 splits the three tied 3.0s: the two earliest win, across layers and within one
    split = Mask.top_k({"a": torch.tensor([1.0, 3.0, 3.0, 0.0]), "b": torch.tensor([2.0, 3.0])}, 2 / 6, min_per_layer=0)
    assert split["a"].tolist() == [False, True, True, False] and split["b"].tolist() == [False, False]
    assert top_positions(torch.tensor([3.0, 1.0, 3.0, 3.0]), 2).tolist() == [True, False, True, False]


def test_layer_floor_keeps_every_layer_alive():
    scores = {"big": torch.full((100,), 10.0), "small": torch.full((10,), 0.1)}
    mask = Mask.top_k(scores, 0.05, min_per_layer=2)
    assert int(mask["small"].sum()) == 2
    assert mask.kept == budget(110, 0.05)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_range_is_rejected(density):
    with pytest.raises(ConfigError, match="density"):
        Mask.top_k({"a": torch.ones(4)}, density)


def test_prunable_names_are_conv_and_linear_weights():
    model = build_model("cnn", (1, 8, 8), 3)
    # four convolutions and the linear classifier, in module order; activations, pools and Standardize have none
    assert prunable_names(model) == ["1.0.weight", "1.2.weight", "1.5.weight", "1.7.weight", "1.12.weight"]
    assert prunable_names(model) == [f"{n}.weight" for n, m in model.named_modules()
                                     if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert prunable_names(nn.Linear(3, 2)) == ["weight"]  # a bare layer is its own root module


def test_apply_zeroes_exactly_the_pruned_weights():
    model = build_model("mlp", (1, 8, 8), 10)
    mask = Mask.top_k(magnitude_scores(model), 0.1)
    mask.apply(model)
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        assert torch.all(params[name][~keep] == 0)
        assert torch.all(params[name][keep] != 0)


def test_save_load_roundtrip_and_bytes(tmp_path):
    mask = Mask.top_k({"w": torch.randn(6, 7), "v": torch.randn(3)}, 0.3)
    mask.save(tmp_path / "m.safetensors")
    loaded = Mask.load(tmp_path / "m.safetensors")
    assert loaded.to_bytes() == mask.to_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_and_missing_mask_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StorageError, match="not a readable safetensors"):
        Mask.load(bad)
    with pytest.raises(StorageError, match="not found"):
        Mask.load(tmp_path / "absent.safetensors")


def test_validate_names_wrong_parameter_and_shape():
    model = build_model("mlp", (1, 8, 8), 10)
    with pytest.raises(MaskError, match="not a parameter"):
        Mask({"nope.weight": torch.ones(2)}).validate(model)
    name = prunable_names(model)[0]
    with pytest.raises(MaskError, match="shape"):
        Mask({name: torch.ones(2, 2)}).validate(model)


def test_density_schedule_ends_at_target():
    steps = density_schedule(0.05, 3)
    assert steps[-1] == 0.05 and steps[0] == pytest.approx(0.05 ** (1 / 3))
    assert steps == sorted(steps, reverse=True)


def test_layer_floors_that_exceed_the_budget_are_refused():
    scores = {f"l{i}": torch.rand(10) for i in range(3)}
    with pytest.raises(MaskError, match="3 layers x min_per_layer 1 need 3 weights, more than the budget of 2"):
        Mask.top_k(scores, 0.05)
    assert Mask.top_k(scores, 0.05, min_per_layer=0).kept == 2


def test_sparsity_is_the_complement_of_density():
    mask = Mask.top_k({"w": torch.rand(40)}, 0.25)
    assert mask.density() == 0.25 and mask.sparsity() == 0.75


def test_erk_counts_follow_the_formula_on_a_hand_checked_model():
    # conv (4, 2, 3, 3): 72 weights, raw (4+2+3+3)/72 = 1/6; fc (10, 36): 360 weights, raw 46/360.
    # budget round(0.2 * 432) = 86 = eps * (12 + 46) -> eps = 1.4828: conv 17.79 -> 18, fc 68.21 -> 68.
    assert erk_counts({"conv": (4, 2, 3, 3), "fc": (10, 36)}, 0.2) == {"conv": 18, "fc": 68}


def test_erk_keeps_a_layer_dense_when_its_share_exceeds_one():
    # small (2, 3): eps * 5/6 > 1 at density 0.1, so it stays dense and 'big' takes the rest of the 501
    assert erk_counts({"small": (2, 3), "big": (50, 100)}, 0.1) == {"small": 6, "big": 495}


def test_erk_floor_lifts_a_starved_layer_and_the_others_pay_for_it():
    shapes = {"big": (100, 100), "mid": (20, 20)}
    assert erk_counts(shapes, 0.05) == {"big": 433, "mid": 87}  # big at 0.87 of its uniform share
    assert erk_counts(shapes, 0.05, floor=0.95) == {"big": 475, "mid": 45}


@pytest.mark.parametrize("density", [0.3, 0.05, 0.01])
def test_erk_counts_sum_to_the_budget_and_respect_floor_and_size(density):
    torch.manual_seed(1)
    shapes = {f"l{i}": tuple(int(d) for d in torch.randint(1, 40, (int(torch.randint(2, 5, ())),)))
              for i in range(8)}
    sizes = {n: int(torch.tensor(s).prod()) for n, s in shapes.items()}
    counts = erk_counts(shapes, density, floor=0.5)
    assert sum(counts.values()) == budget(sum(sizes.values()), density)
    for name, count in counts.items():
        assert 1 <= count <= sizes[name]
        assert count >= min(sizes[name], 0.5 * density * sizes[name]) - 1  # rounding may take one weight


def test_ticket_shares_are_each_layers_density_in_the_global_top_k():
    scores = {"a": torch.tensor([9.0, 8.0, 1.0, 0.5]), "b": torch.tensor([7.0, 0.2, 0.1, 0.3, 0.4, 0.6, 0.7, 0.8])}
    # budget round(0.25 * 12) = 3: the global top 3 are 9, 8 (layer a) and 7 (layer b)
    assert ticket_shares(scores, 0.25) == {"a": 0.5, "b": 0.125}


def test_shared_counts_give_the_ticket_its_own_counts_when_no_floor_binds():
    torch.manual_seed(0)
    scores = {"small": torch.rand(50) * 3, "big": torch.rand(1000)}
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    ticket = Mask.top_k(scores, 0.1)
    assert shared_counts(shapes, ticket_shares(scores, 0.1), 0.1) == ticket.counts()


def test_shared_counts_floor_a_layer_the_ticket_leaves_empty_and_scale_the_others():
    scores = {"a": torch.full((100,), 5.0), "b": torch.full((100,), 4.0), "c": torch.full((800,), 0.1)}
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    shares = ticket_shares(scores, 0.1)  # the global top 100 all lie in layer a
    assert shares == {"a": 1.0, "b": 0.0, "c": 0.0}
    # floor 0.5: b keeps 0.5 * 0.1 * 100 = 5 and c 40; a (the only layer with a share) takes the other 55
    assert shared_counts(shapes, shares, 0.1, floor=0.5) == {"a": 55, "b": 5, "c": 40}


def test_larger_shares_take_each_layers_larger_density_and_halve_at_worst():
    # a (10, 10): ERK raw 20/100, b (10, 90): raw 100/900; budget 100 -> ERK a 16.7 -> 17, b 83.3 -> 83.
    # The ticket puts all 100 in a. Larger densities: a 1.0, b 83/900; scaled by 100 / (100 + 83): a 54.6, b 45.4.
    scores = {"a": torch.full((10, 10), 5.0), "b": torch.full((10, 90), 0.1)}
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    shares = larger_shares(shapes, scores, 0.1)
    assert shares == {"a": 1.0, "b": 83 / 900}
    assert shared_counts(shapes, shares, 0.1) == {"a": 55, "b": 45}


def test_blended_shares_average_the_erk_and_ticket_densities_and_meet_the_budget_unscaled():
    # a (10, 10), b (10, 90), budget 100: ERK a 17, b 83. The ticket keeps a's 61 entries of 5.0 and b's 39 of 1.0
    # (b's other entries 0.01 and a's 0.001 fall below). Mean counts: a (17 + 61) / 2 = 39, b (83 + 39) / 2 = 61.
    a, b = torch.full((10, 10), 0.001), torch.full((10, 90), 0.01)
    a.view(-1)[:61], b.view(-1)[:39] = 5.0, 1.0
    scores = {"a": a, "b": b}
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    shares = blended_shares(shapes, scores, 0.1)
    assert shares == pytest.approx({"a": (0.17 + 0.61) / 2, "b": (83 / 900 + 39 / 900) / 2})
    assert shared_counts(shapes, shares, 0.1) == {"a": 39, "b": 61}


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "resnet20"])
@pytest.mark.parametrize("density", [0.05, 0.02])
@pytest.mark.parametrize("combined_shares", [larger_shares, blended_shares])
def test_combined_shares_keep_at_least_half_of_what_erk_or_the_ticket_gives_each_layer(model_name, density,
                                                                                        combined_shares):
    torch.manual_seed(0)
    model = build_model(model_name, (3, 16, 16), 10)
    names = prunable_names(model)
    params = dict(model.named_parameters())
    # trained-like scores: each layer's magnitudes on its own scale, so ERK and the ticket disagree
    scores = {n: params[n].detach().abs() * float(torch.rand(()) * 4 + 0.1) for n in names}
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    erk = erk_counts(shapes, density)
    ticket = shared_counts(shapes, ticket_shares(scores, density), density)
    counts = shared_counts(shapes, combined_shares(shapes, scores, density), density)
    assert sum(counts.values()) == budget(sum(s.numel() for s in scores.values()), density)
    assert erk != ticket
    for name in names:  # no floors here: a binding floor is paid for by the other layers
        assert counts[name] >= max(erk[name], ticket[name]) // 2 - 1, name


def test_erk_floors_beyond_the_budget_are_refused():
    with pytest.raises(MaskError, match="layer floors need 100 weights, more than the budget of 50"):
        erk_counts({f"l{i}": (100,) for i in range(5)}, 0.1, min_per_layer=20)


def test_a_full_floor_is_met_once_rounded_down_whatever_the_budget_rounds_to():
    """layer_floor 1.0 asks for density x size in every layer: fractional floors summing just above a budget that
    rounded down are met by their integer parts, not refused."""
    shapes = {"c1": (16, 3, 3, 3), "c2": (32, 16, 3, 3), "fc": (10, 512)}
    for density in (0.5 ** (1 / 3), 0.5 ** (2 / 3), 0.7071, 0.3):
        counts = erk_counts(shapes, density, floor=1.0)
        sizes = {n: math.prod(shape) for n, shape in shapes.items()}
        assert sum(counts.values()) == budget(sum(sizes.values()), density)
        assert all(counts[n] >= math.floor(density * sizes[n]) for n in shapes), (density, counts)


def test_floors_count_the_one_weight_every_layer_keeps_even_with_min_per_layer_0():
    shapes = {"big": (100,), **{f"s{i}": (1,) for i in range(10)}}
    with pytest.raises(MaskError, match="layer floors need 15 weights, more than the budget of 11"):
        erk_counts(shapes, 0.1, floor=0.5, min_per_layer=0)  # big's floor 5 plus ten single weights
    with pytest.raises(MaskError, match="layer floors need 5 weights, more than the budget of 4"):
        erk_counts({"a": (6,), "b": (1,), "c": (1,)}, 0.5, floor=1.0, min_per_layer=0)  # was a: 2 under its floor 3


def test_ticket_shares_break_ties_by_position_and_sum_to_the_budget():
    scores = {"a": torch.tensor([3.0, 2.0, 1.0, 1.0]), "b": torch.ones(6)}
    shares = ticket_shares(scores, 0.3)  # budget 3: 3.0, 2.0 and the first tied 1.0, all in 'a'
    assert shares == {"a": 0.75, "b": 0.0}
    assert {n: round(shares[n] * s.numel()) for n, s in scores.items()} == Mask.top_k(scores, 0.3, 0).counts()


def test_nan_scores_are_refused_rather_than_ranked_nowhere():
    with pytest.raises(MaskError, match="scores hold NaN"):
        top_positions(torch.tensor([float("nan"), 1.0, 2.0]), 1)
    assert top_positions(torch.tensor([float("inf"), 1.0, 2.0]), 1).tolist() == [True, False, False]


def test_mask_bytes_tell_shapes_and_pinned_entries_apart():
    flat = torch.tensor([True, False, True, True, False, False])
    assert Mask({"w": flat.reshape(2, 3)}).to_bytes() != Mask({"w": flat.reshape(3, 2)}).to_bytes()
    a, b = torch.tensor([True]), torch.tensor([False])
    assert Mask({"a": a}, pinned={"b": b}).to_bytes() != Mask({"a": a, "b": b}).to_bytes()
    assert Mask({"w": flat.reshape(2, 3)}).to_bytes() == Mask({"w": flat.clone().reshape(2, 3)}).to_bytes()


def test_a_budget_below_one_weight_per_layer_is_refused_even_without_floors():
    shapes = {"a": (300, 784), "b": (100, 300), "c": (10, 100)}
    with pytest.raises(MaskError, match="budget of 1 weights is below one weight for each of the 3 layers"):
        erk_counts(shapes, 3e-6, floor=0.5, min_per_layer=0)
    assert sum(erk_counts(shapes, 1e-5, floor=0.5, min_per_layer=0).values()) == 3


def test_top_k_per_layer_keeps_each_layers_best_weights():
    scores = {"a": torch.tensor([0.1, 0.9, 0.5, 0.9]), "b": torch.tensor([[3.0, 1.0], [2.0, 0.0]])}
    mask = Mask.top_k_per_layer(scores, {"a": 2, "b": 3})
    assert mask["a"].tolist() == [False, True, False, True]
    assert mask["b"].tolist() == [[True, True], [True, False]]
    assert mask.counts() == {"a": 2, "b": 3}
    with pytest.raises(MaskError, match="cannot keep 5 of its 4"):
        Mask.top_k_per_layer(scores, {"a": 5, "b": 1})


@pytest.mark.parametrize("spoil, message", [
    (lambda t: t.to(torch.int64), "is torch.int64, the model expects torch.float32"),
    (lambda t: t.fill_(float("nan")), "holds NaN or infinite values"),
])
def test_weights_of_the_wrong_type_or_not_finite_are_refused(tmp_path, spoil, message):
    from ballot.models import build_model
    from ballot.storage import load_state, save_state

    model = build_model("mlp", (1, 8, 8), 10)
    save_state(model, tmp_path / "w.safetensors")
    state = load_tensors(tmp_path / "w.safetensors")
    first = next(n for n in state if n.endswith("weight"))
    state[first] = spoil(state[first].clone())
    atomic_save_tensors(state, tmp_path / "w.safetensors")
    with pytest.raises(StorageError, match=message):
        load_state(build_model("mlp", (1, 8, 8), 10), tmp_path / "w.safetensors")


@pytest.mark.parametrize("k", [0, 1, 7, 50, 199, 200, 250])
def test_top_positions_equals_a_stable_descending_sort_with_many_ties(k):
    scores = torch.randint(0, 12, (200,), generator=torch.Generator().manual_seed(k)).float()  # ~17 of each value
    expected = torch.zeros(200, dtype=torch.bool)
    expected[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    chosen = top_positions(scores, k)
    assert torch.equal(chosen, expected)
    assert int(chosen.sum()) == min(k, 200)


def test_shared_counts_hold_floors_and_capacities_together_and_sum_to_the_budget():
    """Random layers and skewed shares, the capacity being a previous round's counts: in some cases the capacities
    and the floors bind in the same call."""
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for case in range(500):
        layers = int(torch.randint(2, 8, (1,), generator=generator))
        shapes = {f"l{i}": (int(n),) for i, n in enumerate(torch.randint(10, 2000, (layers,), generator=generator))}
        first, second = ({n: float(s) for n, s in zip(shapes, torch.rand(layers, generator=generator) ** 4)}
                         for _ in range(2))
        outer = float(torch.rand(1, generator=generator)) * 0.5 + 0.05  # the previous round's density
        density = outer * (float(torch.rand(1, generator=generator)) * 0.6 + 0.2)
        try:
            previous = shared_counts(shapes, first, outer, floor=0.5)
            counts = shared_counts(shapes, second, density, floor=0.5, capacity=previous)
        except MaskError:
            continue  # floors beyond the budget: refused, as they should be
        checked += 1
        assert sum(counts.values()) == budget(sum(n for n, in shapes.values()), density), case
        for name, count in counts.items():
            floor = min(previous[name], max(0.5 * density * shapes[name][0], 1))
            assert math.floor(floor) <= count <= previous[name], (case, name, count, floor, previous[name])
    assert checked > 400
