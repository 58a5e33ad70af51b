"""Stage export: the sparse model with masks baked in as ONNX (metadata inside), checked against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ballot.config import ExperimentConfig
from ballot.experiment import load_pruned
from ballot.export import bake, check_parity, export_onnx
from ballot.snapshot import load_snapshot
from ballot.storage import atomic_save_tensors, staged_folder, write_json
from pipelines.common import DATA, EXPORT, METRICS, PRUNE, read_json, run_stage

MODEL_FILE, REPORT_FILE, EXAMPLE_FILE = "model.onnx", "export.json", "input_example.safetensors"
CARD_METRICS = ("density", "acc", "cwv", "mcd", "worst_class")


class ParityError(ValueError):
    """ONNX Runtime's logits differ from PyTorch's by more than the configured tolerance."""


def model_card(metrics: dict[str, Any], cfg: ExperimentConfig, class_names: list[str],
               input_shape: tuple[int, ...]) -> dict[str, Any]:
    """What the ONNX metadata_props (and later the registry's version tags) say about the model."""
    return {**{key: metrics[key] for key in CARD_METRICS}, "dataset": cfg.base.dataset,
            "method": cfg.prune.method, "model": cfg.base.model, "class_names": class_names,
            "input_shape": list(input_shape)}


def initializer_counts(path: Path) -> dict[str, int]:
    """Number of stored parameters in the ONNX file and how many of them are non-zero."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model(str(path))
    arrays = [numpy_helper.to_array(init) for init in proto.graph.initializer]
    return {"onnx_parameters": int(sum(a.size for a in arrays)),
            "onnx_nonzero_parameters": int(sum(np.count_nonzero(a) for a in arrays))}


def main(cfg: ExperimentConfig) -> None:
    data = load_snapshot(DATA)
    model, mask = load_pruned(PRUNE, cfg, data)
    baked = bake(model, mask)
    metrics = read_json(METRICS)
    card = model_card(metrics, cfg, data.class_names, data.input_shape)
    inputs = data.test.x[:cfg.export.parity_samples]
    with staged_folder(EXPORT) as folder:
        path = export_onnx(baked, data.input_shape, folder / MODEL_FILE, card)
        parity = check_parity(baked, path, inputs)
        if not parity["max_abs_diff"] <= cfg.export.parity_tolerance:
            raise ParityError(f"ONNX Runtime differs from PyTorch by {parity['max_abs_diff']:.3g} on "
                              f"{parity['samples']} test inputs (export.parity_tolerance {cfg.export.parity_tolerance})")
        atomic_save_tensors({"input": data.test.x[:2]}, folder / EXAMPLE_FILE)
        report = {"parity": parity, "parity_tolerance": cfg.export.parity_tolerance,
                  "onnx_bytes": path.stat().st_size, **initializer_counts(path)}
        write_json(folder / REPORT_FILE, report)
    print(f"export: parity max |diff| {parity['max_abs_diff']:.2e} on {parity['samples']} inputs  "
          f"argmax agreement {parity['argmax_agreement']:.4f}  {report['onnx_bytes']} bytes -> {EXPORT / MODEL_FILE}")


if __name__ == "__main__":
    run_stage("export", main, errors=(ParityError,))
