"""Bake masks into the weights, export to ONNX (with metadata), and check numeric parity with PyTorch."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ballot.config import ExperimentConfig
from ballot.errors import ParityError, StorageError
from ballot.masks import Mask
from ballot.storage import atomic_write

INPUT_NAME, OUTPUT_NAME = "input", "logits"
CARD_METRICS = ("density", "acc", "cwv", "mcd", "worst_class")


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


def model_card(metrics: dict[str, Any], cfg: ExperimentConfig, class_names: list[str],
               input_shape: Sequence[int]) -> dict[str, Any]:
    """What the ONNX metadata_props (and later the registry's version tags) say about the model; ``dense_acc``
    (what `ballot promote` gates on) when ``metrics`` has the dense reference."""
    missing = [key for key in CARD_METRICS if key not in metrics]
    if missing:
        raise StorageError(f"the metrics lack {missing}: were they written by `ballot prune` or the prune stage?")
    card = {**{key: metrics[key] for key in CARD_METRICS}, "dataset": cfg.base.dataset,
            "method": cfg.prune.method, "model": cfg.base.model, "class_names": list(class_names),
            "input_shape": list(input_shape)}
    if "dense" in metrics:
        card["dense_acc"] = metrics["dense"]["acc"]
    return card


def read_metadata(path: str | Path) -> dict[str, Any]:
    """metadata_props of an ONNX file written by ``export_onnx``, JSON-decoded; StorageError naming the file when
    it is missing or is not such a file."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise StorageError(f"ONNX file '{path}' not found")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
        return {p.key: json.loads(p.value) for p in proto.metadata_props}
    except (DecodeError, json.JSONDecodeError, OSError, ValueError) as error:
        raise StorageError(f"'{path}' is not an ONNX file written by `ballot export`: {error}") from None


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


def initializer_counts(path: str | Path) -> dict[str, int]:
    """Number of stored parameters in the ONNX file and how many of them are non-zero."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model(str(path))
    arrays = [numpy_helper.to_array(init) for init in proto.graph.initializer]
    return {"onnx_parameters": int(sum(a.size for a in arrays)),
            "onnx_nonzero_parameters": int(sum(np.count_nonzero(a) for a in arrays))}


def export_checked(baked: nn.Module, input_shape: Sequence[int], path: str | Path, card: dict[str, Any],
                   inputs: torch.Tensor, tolerance: float) -> dict[str, Any]:
    """Export ``baked`` (see ``bake``) with ``card`` as metadata and check it on ``inputs``; ``path`` is replaced
    only when ONNX Runtime agrees with PyTorch within ``tolerance`` (else ParityError). Returns the export report:
    parity, tolerance, file size and initializer counts."""
    report: dict[str, Any] = {}

    def write(tmp: str) -> None:
        export_onnx(baked, input_shape, tmp, card)
        parity = check_parity(baked, tmp, inputs)
        if not parity["max_abs_diff"] <= tolerance:
            raise ParityError(f"ONNX Runtime differs from PyTorch by {parity['max_abs_diff']:.3g} on "
                              f"{parity['samples']} test inputs (export.parity_tolerance {tolerance})")
        report.update(parity=parity, parity_tolerance=tolerance, onnx_bytes=Path(tmp).stat().st_size,
                      **initializer_counts(tmp))

    atomic_write(path, write)
    return report
