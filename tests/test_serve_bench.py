"""serve_bench's PyTorch twin: rebuilt from a dense file's initializers, declined with a reason for a compact one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ballot.export import bake, export_checked
from ballot.masks import Mask, magnitude_scores
from ballot.models import build_model
from serving.model_source import fetch_model
from serving.runtime import OnnxModel

_BENCH = Path(__file__).parents[1] / "benchmarks" / "serve_bench.py"
_SPEC = importlib.util.spec_from_file_location("serve_bench", _BENCH)
serve_bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(serve_bench)

SHAPE = (1, 28, 28)


def _exported(tmp_path: Path, compact: bool) -> tuple[torch.nn.Module, OnnxModel, Path]:
    torch.manual_seed(0)
    model = build_model("mlp", SHAPE, 10)
    baked = bake(model, Mask.top_k(magnitude_scores(model), 0.05)).eval()
    card = {"model": "mlp", "density": 0.05, "input_shape": list(SHAPE), "class_names": [str(c) for c in range(10)]}
    path = tmp_path / f"{'compact' if compact else 'dense'}.onnx"
    export_checked(baked, SHAPE, path, card, torch.rand(4, *SHAPE), 1e-4, compact=compact)
    with fetch_model(str(path)) as source:
        return baked, OnnxModel.load(source, device="cpu", threads=1), path


def test_the_twin_of_a_dense_file_computes_what_the_exported_model_does(tmp_path: Path) -> None:
    baked, onnx_model, path = _exported(tmp_path, compact=False)
    twin, why = serve_bench.torch_twin(path, onnx_model)
    assert twin is not None and why == ""
    x = torch.rand(16, *SHAPE)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), baked(x))


@pytest.mark.parametrize("card_model", ["mlp", ""])
def test_a_compact_file_or_one_without_architecture_gets_no_twin_and_a_reason(tmp_path: Path, card_model: str) -> None:
    _, onnx_model, path = _exported(tmp_path, compact=True)
    onnx_model.card = onnx_model.card.model_copy(update={"model": card_model})
    twin, why = serve_bench.torch_twin(path, onnx_model)
    assert twin is None
    assert ("compact file" in why) if card_model else ("no 'model'" in why)
