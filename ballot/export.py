"""Bake masks into the weights, export to ONNX (with metadata), and check numeric parity with PyTorch."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ballot.masks import Mask
from ballot.storage import atomic_write

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def bake(model: nn.Module, mask: Mask | None) -> nn.Module:
    """An eval-mode copy of ``model`` on the CPU with pruned weights set to exactly zero."""
    baked = copy.deepcopy(model).cpu().eval()
    if mask is not None:
        mask.apply(baked)
    return baked


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: str | Path,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis; ``metadata`` goes into metadata_props (JSON values)."""
    import onnx

    model = copy.deepcopy(model).cpu().eval()
    example = torch.rand(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)

    def write(tmp: str) -> None:
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False)
        proto = program.model_proto
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        onnx.checker.check_model(proto)
        onnx.save_model(proto, tmp)

    return atomic_write(path, write)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """metadata_props of an ONNX file written by ``export_onnx``, JSON-decoded."""
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def check_parity(model: nn.Module, onnx_path: str | Path, inputs: torch.Tensor) -> dict[str, float]:
    """Max / mean absolute logit difference and argmax agreement of ONNX Runtime vs PyTorch on ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.cpu().eval()(inputs.cpu()).numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.cpu().numpy().astype(np.float32)})[0]
    diff = np.abs(expected - got)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "argmax_agreement": float((expected.argmax(1) == got.argmax(1)).mean()), "samples": int(len(inputs))}
