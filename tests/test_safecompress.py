import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ballot.cli import main
from ballot.errors import ConfigError
from ballot.experiment import model_metrics, run_prune
from ballot.fairness import evaluate
from ballot.masks import Mask, budget, magnitude_scores
from ballot.pruning.dst import apply_update, death_rate_at, drop_and_grow, erk_random_mask, masked_step
from ballot.pruning.fair_terms import class_loss_variance
from ballot.pruning.safecompress import gated_update, lr_at, validation_score
from tests.conftest import tiny_config
from tests.test_cli import TINY_FLAGS

FAST = ["prune.method=safecompress", "prune.safecompress.epochs=3", "prune.safecompress.updates=3"]


def three_layers() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5), nn.ReLU(), nn.Linear(5, 2))


def test_initial_mask_has_erk_counts_on_a_hand_checked_model():
    # raw ERK densities (out + in) / (out * in): 30/200 = 0.15, 25/100 = 0.25, 7/10 = 0.7; budget 0.5 * 310 = 155.
    # eps = 155 / (30 + 25 + 7) = 2.5 puts the last layer at 1.75 > 1, so it is dense (10); then
    # eps = 145 / 55: 0.15 * 200 * eps = 79.09 -> 79 and 0.25 * 100 * eps = 65.91 -> 66.
    mask = erk_random_mask(three_layers(), 0.5, 1, torch.Generator().manual_seed(0))
    assert mask.counts() == {"0.weight": 79, "2.weight": 66, "4.weight": 10}
    assert mask.kept == budget(310, 0.5) and set(mask) == {"0.weight", "2.weight", "4.weight"}  # biases unmasked
    other = erk_random_mask(three_layers(), 0.5, 1, torch.Generator().manual_seed(1))
    assert other.counts() == mask.counts() and other.to_bytes() != mask.to_bytes()  # random positions


def test_drop_and_grow_keeps_every_layers_count_and_drops_its_smallest_weights():
    torch.manual_seed(0)
    model = three_layers()
    mask = erk_random_mask(model, 0.3, 1, torch.Generator().manual_seed(0))
    weights = {n: p.detach() for n, p in model.named_parameters() if n in mask}
    grads = {n: torch.randn_like(w) for n, w in weights.items()}
    for growth in ("random", "gradient"):
        new = drop_and_grow(weights, mask, 0.3, growth, torch.Generator().manual_seed(0), grads)
        assert new.counts() == mask.counts() and new.to_bytes() != mask.to_bytes()
        for name, keep in mask.items():
            dropped, grown = keep & ~new[name], new[name] & ~keep
            k = min(math.ceil(0.3 * int(keep.sum())), int((~keep).sum()))
            assert int(dropped.sum()) == int(grown.sum()) == k
            if k == 0:  # a dense layer (ERK share above 1)
                continue
            survivors = weights[name].abs()[keep & new[name]]
            assert weights[name].abs()[dropped].max() <= survivors.min()  # the smallest active |w| went
            if growth == "gradient":
                assert grads[name].abs()[grown].min() >= grads[name].abs()[~keep & ~new[name]].max()


def test_a_dense_layer_is_left_alone():
    mask = Mask({"w": torch.ones(4, 4, dtype=torch.bool)})
    new = drop_and_grow({"w": torch.randn(4, 4)}, mask, 0.5, "random", torch.Generator().manual_seed(0))
    assert new.to_bytes() == mask.to_bytes()


def test_regrown_weights_start_at_exactly_zero():
    torch.manual_seed(0)
    model = three_layers()  # every weight non-zero, as if nothing had been masked
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    old = erk_random_mask(model, 0.3, 1, torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = drop_and_grow(before, old, 0.5, "random", torch.Generator().manual_seed(0))
    apply_update(model, optimizer, old, new)
    params = dict(model.named_parameters())
    assert any((new[n] & ~old[n]).any() for n in old)
    for name in old:
        grown, dropped = new[name] & ~old[name], old[name] & ~new[name]
        assert torch.all(params[name][grown] == 0)
        assert torch.all(params[name][dropped] == 0)
        assert torch.equal(params[name][old[name] & new[name]], before[name][old[name] & new[name]])


def test_masked_momentum_cannot_revive_a_pruned_weight():
    torch.manual_seed(0)
    model = three_layers()
    x, y = torch.randn(64, 10), torch.randint(0, 2, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mask = erk_random_mask(model, 0.3, 1, torch.Generator().manual_seed(0))
    bound = mask.on(model)
    bound.zero_weights()

    def steps(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            masked_step(optimizer, bound)

    steps(5)
    params = dict(model.named_parameters())
    new = drop_and_grow(params, mask, 0.5, "random", torch.Generator().manual_seed(0))
    dropped = {n: mask[n] & ~new[n] for n in mask}
    changed = [n for n in mask if dropped[n].any()]
    assert changed and all(optimizer.state[params[n]]["momentum_buffer"][dropped[n]].abs().sum() > 0 for n in changed)
    bound = apply_update(model, optimizer, mask, new)
    steps(5)
    for name, keep in new.items():
        buffer = optimizer.state[params[name]]["momentum_buffer"]
        assert torch.all(params[name][~keep] == 0) and torch.all(buffer[~keep] == 0)
        assert buffer[keep].abs().sum() > 0  # the survivors do have momentum


def test_the_validation_test_rejects_an_update_that_wrecks_the_model(tiny_data, tiny_dense):
    from ballot.models import build_model

    model = build_model("mlp", tiny_data.input_shape, tiny_data.num_classes)
    model.load_state_dict(tiny_dense.trained_state)
    mask = Mask.top_k(magnitude_scores(model), 0.5)
    mask.apply(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def score(m: nn.Module) -> float:
        return validation_score(evaluate(m, tiny_data.val.x, tiny_data.val.y, tiny_data.num_classes), 10.0)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # at death rate 0.99 every layer swaps all of its active weights for zeros: the model stops working
    kept, record = gated_update(model, optimizer, mask, score, 0.99, ["random"], 0.02,
                                 torch.Generator().manual_seed(0))
    assert record["accepted"] is False and record["candidates"]["random"] < record["current"] - 0.02
    assert kept.to_bytes() == mask.to_bytes()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # a gentle update passes the same test
    kept, record = gated_update(model, optimizer, mask, score, 0.001, ["random", "gradient"], 0.05,
                                 torch.Generator().manual_seed(0), {n: torch.randn_like(before[n]) for n in mask})
    assert record["accepted"] is True and record["chosen"] in ("random", "gradient")
    assert kept.to_bytes() != mask.to_bytes() and kept.counts() == mask.counts()


def test_schedules():
    assert death_rate_at(0, 100, 0.5, 0.005) == pytest.approx(0.5)
    assert death_rate_at(50, 100, 0.5, 0.005) == pytest.approx(0.2525)
    assert death_rate_at(100, 100, 0.5, 0.005) == pytest.approx(0.005)
    cfg = tiny_config().prune.safecompress
    assert [lr_at(cfg, e) for e in (0, 29, 30, 44, 45, 59)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_class_loss_variance_by_hand():
    losses, y = torch.tensor([1.0, 3.0, 2.0, 6.0]), torch.tensor([0, 0, 1, 2])
    assert float(class_loss_variance(losses, y, 4)) == pytest.approx(((2 - 10 / 3) ** 2 + (2 - 10 / 3) ** 2 +
                                                                     (6 - 10 / 3) ** 2) / 3)  # class 3 absent
    assert float(class_loss_variance(losses, torch.zeros(4, dtype=torch.long), 4)) == 0.0


def test_safecompress_is_deterministic_and_meets_the_budget(tiny_data, tiny_dense):
    cfg = tiny_config(*FAST, "base.density=0.05")
    first, second = run_prune(cfg, tiny_data, tiny_dense), run_prune(cfg, tiny_data, tiny_dense)
    assert first.mask.to_bytes() == second.mask.to_bytes()
    assert model_metrics(first.model, tiny_data, "cpu") == model_metrics(second.model, tiny_data, "cpu")
    assert first.mask.kept == budget(first.mask.total, 0.05)
    details = json.loads(json.dumps(first.details.to_json()))
    assert len(details["updates"]) == details["accepted"] + details["rejected"] >= 2
    assert 1 <= details["best_epoch"] <= 3


@pytest.mark.parametrize("override, message", [
    ("prune.safecompress.growth=[magic]", r"prune.safecompress.growth: must list one or more of"),
    ("prune.safecompress.death_rate=1.5", r"prune.safecompress.death_rate: must be in \(0, 1\)"),
    ("prune.safecompress.fair_loss=gentle", "prune.safecompress.fair_loss: unknown 'gentle'"),
    ("prune.safecompress.lr_milestones=[0.5, 2]", "prune.safecompress.lr_milestones: must be fractions"),
])
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)


def test_cli_prunes_digits_with_safecompress(tmp_path):
    out = tmp_path / "run"
    code = main(["prune", "--dataset", "digits", "--model", "mlp", "--method", "safecompress", "--density", "0.05",
                 "--seed", "0", "--device", "cpu", "--out", str(out), *TINY_FLAGS,
                 "--set", "prune.safecompress.epochs=3"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "safecompress"
    mask = Mask.load(out / "mask.safetensors")
    assert mask.kept == budget(mask.total, 0.05)
    assert "updates" in json.loads((out / "details.json").read_text())
