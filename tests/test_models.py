import re

import pytest
import torch

from ballot.errors import ModelError
from ballot.models import MODELS, build_model


@pytest.mark.parametrize("shape", [(3, 2, 2), (3, 1, 1), (1, 8, 3)])
def test_cnn_refuses_images_too_small_for_its_two_pools(shape):
    with pytest.raises(ModelError, match=re.escape(f"model 'cnn' needs images of at least 4x4 pixels (two 2x2 "
                                                   f"max-pools); the dataset gives shape {shape}")):
        build_model("cnn", shape, 3)


def test_cnn_takes_the_smallest_images_it_can_pool():
    assert build_model("cnn", (3, 4, 4), 3)(torch.rand(2, 3, 4, 4)).shape == (2, 3)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 12), (1, 28, 28)])
def test_every_model_takes_grey_colour_non_square_and_tiny_images(name, shape):
    logits = build_model(name, shape, 7).eval()(torch.rand(2, *shape))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_same_seed_builds_the_same_model(name):
    torch.manual_seed(3)
    first = build_model(name, (3, 8, 8), 4).state_dict()
    torch.manual_seed(3)
    second = build_model(name, (3, 8, 8), 4).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_standardisation_statistics_and_class_count_are_checked():
    model = build_model("cnn", (3, 8, 8), 2, mean=torch.tensor([0.1, 0.2, 0.3]), std=torch.full((3, 1, 1), 2.0))
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(model[0](x), (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 2)
    with pytest.raises(ModelError, match=re.escape("mean has 1 values; inputs of shape (3, 8, 8) need 3")):
        build_model("cnn", (3, 8, 8), 2, mean=torch.tensor(0.5))
    with pytest.raises(ModelError, match="needs at least one class, got 0"):
        build_model("mlp", (1, 8, 8), 0)
    with pytest.raises(ModelError, match=r"unknown model 'lenet'; choose from \['cnn'"):
        build_model("lenet", (1, 8, 8), 2)


def test_the_lstm_reads_an_image_row_by_row_or_a_sequence_step_by_step():
    torch.manual_seed(0)
    image = build_model("lstm", (3, 5, 4), 2).eval()
    assert image[1].recurrent.input_size == 3 * 4, "a step is one row of every channel"
    for layer in (0, 1):  # forget gates open at the start: input bias 1 on the second of the i, f, g, o quarters
        bias = getattr(image[1].recurrent, f"bias_ih_l{layer}")
        assert torch.equal(bias[128:256], torch.ones(128)) and not torch.equal(bias[:128], torch.ones(128))
    x = torch.rand(2, 3, 5, 4)
    with torch.no_grad():
        rows = image[0](x).permute(0, 2, 1, 3).reshape(2, 5, 12)  # standardised, then (batch, row, channel x column)
        assert torch.equal(image(x), image[1].head(image[1].recurrent(rows)[0][:, -1]))
        assert not torch.equal(image(x), image(x.flip(2))), "row order matters"
    sequence = build_model("lstm", (20, 6), 3)
    assert sequence[1].recurrent.input_size == 6 and sequence(torch.rand(4, 20, 6)).shape == (4, 3)
    with pytest.raises(ModelError, match=re.escape("model 'lstm' needs image (C, H, W) or sequence (steps, features) "
                                                   "inputs; the dataset gives shape (30,)")):
        build_model("lstm", (30,), 3)
