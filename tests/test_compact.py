"""Dead-unit removal: exactly the dead or unread units go, and the outputs do not move."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ballot.compact import remove_dead_units
from ballot.models import build_model

SHAPE = (1, 8, 8)


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so a zero conv output is not a zero BN output."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _same_outputs(before: nn.Module, after: nn.Module) -> None:
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = before.eval()(x), after.eval()(x)
    assert torch.allclose(expected, got, atol=1e-5, rtol=0), (expected - got).abs().max()


@torch.no_grad()
def test_mlp_loses_dead_and_unread_neurons_but_keeps_a_constant_one():
    model = build_model("mlp", SHAPE, 10).eval()
    first, second, head = model[1][1], model[1][3], model[1][5]
    first.weight[3] = 0; first.bias[3] = 0          # dead: zero in, zero bias
    first.weight[5] = 0; first.bias[5] = -0.5       # dead after the ReLU: constant -0.5 clamped to 0
    first.weight[9] = 0; first.bias[9] = 0.5        # constant 0.5 that the next layer reads: must stay
    second.weight[:, 11] = 0                        # unread: no consumer weight on it
    head.weight[:, 7] = 0                           # unread by the classifier
    compact, removed = remove_dead_units(model, SHAPE)
    assert removed == {"1.1": 3, "1.3": 1}
    assert compact[1][1].out_features == 297 and compact[1][3].in_features == 297
    assert compact[1][5].out_features == 10, "the classifier's outputs are never removed"
    _same_outputs(model, compact)


@torch.no_grad()
def test_nothing_dead_leaves_the_model_as_it_is():
    model = build_model("cnn", SHAPE, 10).eval()
    compact, removed = remove_dead_units(model, SHAPE)
    assert removed == {}
    assert [p.shape for p in compact.parameters()] == [p.shape for p in model.parameters()]


@torch.no_grad()
def test_cnn_channels_through_pooling_and_flatten():
    model = build_model("cnn", SHAPE, 10).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    convs[0].weight[4] = 0; convs[0].bias[4] = 0    # dead channel before a max-pool-free block
    convs[1].weight[2] = 0; convs[1].bias[2] = -1.0  # dead after ReLU, then max-pooled
    convs[3].weight[6] = 0; convs[3].bias[6] = 0.2   # constant through mean -> linear: must stay
    model[1][-1].weight[:, 9] = 0                    # last conv's channel 9 unread through mean + flatten
    compact, removed = remove_dead_units(model, SHAPE)
    assert removed == {"1.0": 1, "1.2": 1, "1.7": 1}
    assert model[1][-1].in_features == 64 and compact[1][-1].in_features == 63
    _same_outputs(model, compact)


@torch.no_grad()
def test_resnet20_residual_coupled_channel_goes_only_when_every_member_allows_it():
    model = build_model("resnet20", SHAPE, 10).eval()
    _randomise_norms(model)
    net = model[1]
    # stage 1 (16 channels) is one group: stem, three blocks' conv2/bn2 and adds, the consumers conv1 of each
    # block and the next stage's conv1 and shortcut. Channel 5 is unread by all of them.
    for block in (net[3], net[4], net[5]):
        block.conv1.weight[:, 5] = 0
    net[6].conv1.weight[:, 5] = 0
    net[6].shortcut[0].weight[:, 5] = 0
    # channel 8: unread by every consumer but one (the next stage's shortcut): must stay
    for block in (net[3], net[4], net[5]):
        block.conv1.weight[:, 8] = 0
    net[6].conv1.weight[:, 8] = 0
    # inside block 1.4 (conv1 -> bn1 -> relu -> conv2): channel 2 dead by a zero BN (scale and shift 0),
    # channel 3 by zero conv weights and a BN whose constant is negative before the ReLU
    net[4].bn1.weight[2] = 0; net[4].bn1.bias[2] = 0
    net[4].conv1.weight[3] = 0; net[4].bn1.bias[3] = -1.0
    # channel 4: zero BN scale but shift 0.3, a constant the block's conv2 reads: must stay
    net[4].bn1.weight[4] = 0; net[4].bn1.bias[4] = 0.3
    compact, removed = remove_dead_units(model, SHAPE)
    assert removed == {"1.0": 1, "1.3.conv2": 1, "1.4.conv1": 2, "1.4.conv2": 1, "1.5.conv2": 1}
    assert compact[1][6].shortcut[0].in_channels == 15 and compact[1][4].bn1.num_features == 14
    _same_outputs(model, compact)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@torch.no_grad()
def test_a_layer_whose_units_are_all_dead_keeps_one(name):
    model = build_model(name, SHAPE, 10).eval()
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    first.weight.zero_(); first.bias.zero_()
    compact, _ = remove_dead_units(model, SHAPE)
    assert next(m for m in compact.modules() if isinstance(m, (nn.Linear, nn.Conv2d))).weight.shape[0] == 1
    _same_outputs(model, compact)
