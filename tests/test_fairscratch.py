import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ballot.cli import main
from ballot.experiment import run_prune
from ballot.masks import Mask, budget
from ballot.models import build_model
from ballot.errors import ConfigError
from ballot.pruning import DenseArtifacts, PruneContext, fairscratch
from ballot.pruning.fair_terms import group_parity_gap
from ballot.pruning.fairscratch import ScratchTicket, fit_scores, freeze_as_scratch, uniform_counts
from tests.conftest import tiny_config
from tests.test_cli import TINY_FLAGS

FAST = ["prune.method=fairscratch", "prune.fairscratch.epochs=2"]


def context(data, dense, *overrides: str) -> PruneContext:
    cfg = tiny_config(*FAST, *overrides)
    return PruneContext(data=data, model_name=cfg.base.model, density=cfg.base.density, seed=cfg.base.seed,
                        dense=dense, config=cfg.prune)


def ticket_for(ctx: PruneContext, selection: str = "per_layer") -> ScratchTicket:
    return ScratchTicket(ctx.model_from(ctx.dense.init_state), ctx.density, selection, 1,
                         torch.Generator().manual_seed(0), scale_fan=True)


def test_weights_never_change_while_the_scores_do(tiny_data, tiny_dense):
    ctx = context(tiny_data, tiny_dense)
    ticket = ticket_for(ctx)
    weights = {n: w.detach().clone() for n, w in ticket.weights.items()}
    scores = {n: s.detach().clone() for n, s in ticket.scores.items()}
    fit = fit_scores(ticket, ctx, ctx.config.fairscratch)
    for name, w in ticket.weights.items():
        assert w.numpy().tobytes() == weights[name].numpy().tobytes()
        assert not torch.equal(ticket.scores[name], scores[name])
        fan_in = w[0].numel()
        expected = ctx.dense.init_state[name].sign() * math.sqrt(2.0 / (fan_in * ctx.density))
        assert torch.equal(w, expected)  # theta_0's signs times the scaled constant
    final = dict(fit.model.named_parameters())
    for name, keep in fit.mask.items():
        assert torch.equal(final[name][keep], weights[name][keep]) and torch.all(final[name][~keep] == 0)


def test_straight_through_gradients_reach_the_scores_of_pruned_weights_too(tiny_data, tiny_dense):
    ticket = ticket_for(context(tiny_data, tiny_dense))
    F.cross_entropy(ticket(tiny_data.train.x[:128]), tiny_data.train.y[:128]).backward()
    keep = ticket.keep()
    for name, score in ticket.scores.items():
        assert score.grad is not None and torch.count_nonzero(score.grad[~keep[name]]) > 0, name
        assert ticket.weights[name].grad is None and not ticket.weights[name].requires_grad


@pytest.mark.parametrize("selection", ["per_layer", "global"])
def test_same_seed_same_mask_bytes_and_exact_budget(selection, tiny_data, tiny_dense):
    cfg = tiny_config(*FAST, f"prune.fairscratch.selection={selection}", "base.density=0.05")
    first, second = run_prune(cfg, tiny_data, tiny_dense), run_prune(cfg, tiny_data, tiny_dense)
    assert first.mask.to_bytes() == second.mask.to_bytes()
    assert first.mask.kept == budget(first.mask.total, 0.05)
    other = run_prune(tiny_config(*FAST, f"prune.fairscratch.selection={selection}", "base.density=0.05",
                                  "base.seed=1"), tiny_data, tiny_dense)
    assert other.mask.to_bytes() != first.mask.to_bytes()
    json.dumps(first.details.to_json())


def test_per_layer_counts_share_one_density_and_sum_to_the_budget():
    counts = uniform_counts({"a": 1000, "b": 300, "c": 7}, budget(1307, 0.1), floor=1)
    assert sum(counts.values()) == 131 and counts == {"a": 100, "b": 30, "c": 1}
    # the floor lifts three tiny layers above their share; the big layer pays for it
    assert uniform_counts({"a": 1000, "b": 3, "c": 3, "d": 3}, 10, floor=1) == {"a": 7, "b": 1, "c": 1, "d": 1}


def test_the_group_penalty_is_used_when_the_data_has_a_group(tiny_data, tiny_dense, monkeypatch):
    gaps = []  # (gap, batch size) of every call to group_parity_gap

    def recording_gap(logits, group):
        gap = group_parity_gap(logits, group)
        gaps.append((float(gap.detach()), len(group)))
        return gap

    monkeypatch.setattr(fairscratch, "group_parity_gap", recording_gap)
    generator = torch.Generator().manual_seed(0)
    group = torch.randint(0, 2, (len(tiny_data.train),), generator=generator)
    grouped = dataclasses.replace(tiny_data, train=dataclasses.replace(tiny_data.train, group=group))
    fit = fit_scores(ticket_for(context(grouped, tiny_dense)), context(grouped, tiny_dense),
                     context(grouped, tiny_dense).config.fairscratch)
    assert fit.penalty == "group_parity" and all(h["penalty"] > 0 for h in fit.history)
    # each epoch's penalty is the sample-weighted mean of the parity gaps of its batches
    per_epoch = len(gaps) // len(fit.history)
    assert per_epoch > 0 and len(gaps) == per_epoch * len(fit.history)
    for epoch, record in enumerate(fit.history):
        batch = gaps[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert sum(n for _, n in batch) == len(grouped.train)
        assert record["penalty"] == pytest.approx(sum(gap * n for gap, n in batch) / len(grouped.train), rel=1e-5)
    gaps.clear()
    plain = fit_scores(ticket_for(context(tiny_data, tiny_dense)), context(tiny_data, tiny_dense),
                       context(tiny_data, tiny_dense).config.fairscratch)
    assert plain.penalty == "class_variance" and not gaps
    with pytest.raises(ConfigError, match="needs a dataset with a group"):
        ctx = context(tiny_data, tiny_dense, "prune.fairscratch.penalty=group_parity")
        fit_scores(ticket_for(ctx), ctx, ctx.config.fairscratch)


def test_group_parity_gap_by_hand():
    # group 0 predicts class 0 with prob 0.9 and 0.7 (mean 0.8), group 1 predicts class 0 with prob 0.4
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6]])
    gap = group_parity_gap(probs.log(), torch.tensor([0, 0, 1]))
    assert float(gap) == pytest.approx(0.4)
    assert float(group_parity_gap(probs.log(), torch.tensor([1, 1, 1]))) == 0.0


def test_batchnorm_is_frozen_at_the_identity_affine_and_the_model_keeps_its_architecture():
    model = build_model("resnet20", (3, 8, 8), 10)
    freeze_as_scratch(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    assert not any(p.requires_grad for p in model.parameters())
    build_model("resnet20", (3, 8, 8), 10).load_state_dict(model.state_dict())


def test_every_prunable_weight_becomes_a_signed_constant_attention_projections_included():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Flatten(), nn.Linear(32, 3))
    signs = {name: p.sign() for name, p in model.named_parameters()}
    freeze_as_scratch(model)
    params = dict(model.named_parameters())
    for name in ("0.self_attn.in_proj_weight", "0.self_attn.out_proj.weight", "0.linear1.weight", "2.weight"):
        fan = params[name][0].numel()
        assert torch.equal(params[name], signs[name] * (2.0 / fan) ** 0.5), name
    for name in ("0.self_attn.in_proj_bias", "0.self_attn.out_proj.bias", "0.linear1.bias", "2.bias"):
        assert not params[name].any(), name


def test_cli_prunes_digits_with_fairscratch(tmp_path):
    out = tmp_path / "run"
    code = main(["prune", "--dataset", "digits", "--model", "mlp", "--method", "fairscratch", "--density", "0.05",
                 "--seed", "0", "--device", "cpu", "--out", str(out), *TINY_FLAGS,
                 "--set", "prune.fairscratch.epochs=3"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "fairscratch"
    mask = Mask.load(out / "mask.safetensors")
    assert mask.kept == budget(mask.total, 0.05)
    assert json.loads((out / "details.json").read_text())["penalty"] == "class_variance"


def test_a_group_penalty_without_a_group_is_refused_before_any_training(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--dataset", "digits", "--method", "fairscratch", "--out", str(out), *TINY_FLAGS,
                 "--set", "prune.fairscratch.penalty=group_parity"])
    err = capsys.readouterr().err
    assert code == 2 and "ballot: error: prune.fairscratch.penalty: 'group_parity' needs a dataset with a group" in err
    assert "dense:" not in err, "refused before the dense model trains"
    assert not out.exists()


def test_a_batchnorm_model_trains_its_scores_without_a_one_sample_batch(tiny_data):
    """vgg on 8x8 inputs pools to 1x1 maps, where a one-sample batch cannot be normalised."""
    split = dataclasses.replace(tiny_data.train, x=tiny_data.train.x[:55], y=tiny_data.train.y[:55])
    data = dataclasses.replace(tiny_data, train=split)
    torch.manual_seed(0)
    model = build_model("vgg", data.input_shape, data.num_classes)
    dense = DenseArtifacts(model.state_dict(), model.state_dict(), model.state_dict())
    ctx = context(data, dense, "base.model=vgg", "prune.fairscratch.epochs=1", "prune.fairscratch.min_steps=0",
                  "prune.fairscratch.batch_size=54")
    assert fit_scores(ticket_for(ctx), ctx, ctx.config.fairscratch).history
