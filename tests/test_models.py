import re

import pytest
import torch

from ballot.errors import ModelError
from ballot.models import build_model


@pytest.mark.parametrize("shape", [(3, 2, 2), (3, 1, 1), (1, 8, 3)])
def test_cnn_refuses_images_too_small_for_its_two_pools(shape):
    with pytest.raises(ModelError, match=re.escape(f"model 'cnn' needs images of at least 4x4 pixels (two 2x2 "
                                                   f"max-pools); the dataset gives shape {shape}")):
        build_model("cnn", shape, 3)


def test_cnn_takes_the_smallest_images_it_can_pool():
    assert build_model("cnn", (3, 4, 4), 3)(torch.rand(2, 3, 4, 4)).shape == (2, 3)
