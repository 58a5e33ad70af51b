"""Fairness-checked INT8 quantization of a float ONNX model with ``onnxruntime.quantization``.

The INT8 model is measured against the float one on the same test inputs (accuracy and class-wise variance from the
ONNX Runtime logits); it is refused with a QuantizationError when it loses more than the configured accuracy or
adds more than the configured CWV. The quantizer needs the weights as initializers, so it reads the dense float
graph (dead units already removed), not the packed one.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ballot.config import ExportConfig
from ballot.errors import QuantizationError
from ballot.fairness import class_metrics

if TYPE_CHECKING:
    from ballot.data import DataBundle

METRIC_KEYS = ("acc", "cwv", "mcd", "worst_class")
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class QuantizationGate:
    """How to quantize, what to measure on, and the limits the INT8 model must stay within."""

    mode: str  # "dynamic" (weights INT8, activations quantized on the fly) or "static" (calibrated activations)
    max_acc_drop: float
    max_cwv_rise: float
    x: np.ndarray  # test inputs, float32 [n, *input_shape]
    y: np.ndarray  # their labels
    num_classes: int
    calibration: np.ndarray | None = None  # training inputs for static calibration

    def __post_init__(self) -> None:
        modes = [mode for mode in ExportConfig.QUANTIZE_MODES if mode != "none"]
        if self.mode not in modes:
            raise QuantizationError(f"quantization mode '{self.mode}': choose from {modes}")
        if self.mode == "static" and (self.calibration is None or not len(self.calibration)):
            raise QuantizationError("static quantization needs calibration inputs (export.calibration_samples > 0)")


def gate_for(cfg: ExportConfig, data: DataBundle, seed: int = 0) -> QuantizationGate | None:
    """The gate that ``cfg`` (export.quantize and its limits) asks for, on the test split with calibration inputs
    from the training split (``calibration_index`` with ``seed``); None for 'none'."""
    if cfg.quantize == "none":
        return None
    rows = calibration_index(data.train.y, cfg.calibration_samples, data.num_classes, seed)
    return QuantizationGate(cfg.quantize, cfg.max_quant_acc_drop, cfg.max_quant_cwv_rise, data.test.x.numpy(),
                            data.test.y.numpy(), data.num_classes, data.train.x[rows].numpy())


def calibration_index(y: torch.Tensor, samples: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Positions (in file order) of min(``samples``, len(``y``)) rows, class-stratified: every class gets an equal
    share, or all its rows when it has fewer (what they leave goes to the larger classes), drawn at random within
    the class (seeded by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(y, minlength=num_classes).tolist()
    left = min(samples, len(y))
    chosen: list[torch.Tensor] = []
    for rank, label in enumerate(sorted(range(num_classes), key=lambda c: counts[c])):  # smallest classes first
        share = min(counts[label], left // (num_classes - rank))
        members = torch.nonzero(y == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:share]])
        left -= share
    return torch.sort(torch.cat(chosen)).values


def onnx_class_metrics(path: str | Path, x: np.ndarray, y: np.ndarray, num_classes: int,
                       batch_size: int = 1024) -> dict[str, float]:
    """acc, cwv, mcd and worst_class of the ONNX model at ``path`` on (x, y), from ONNX Runtime's argmax."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = [session.run(None, {name: np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32)})[0]
              for i in range(0, len(x), batch_size)]
    metrics = class_metrics(y, np.concatenate(logits).argmax(1), num_classes)
    return {key: float(metrics[key]) for key in METRIC_KEYS}


def quantize(float_path: str | Path, out_path: str | Path, mode: str, calibration: np.ndarray | None = None) -> None:
    """Write the INT8 version of ``float_path`` to ``out_path``: dynamic, or static (per-channel weights,
    activation ranges calibrated on ``calibration``); both after ONNX Runtime's pre-processing.

    Static uses the QOperator format (QLinearConv, QGemm, QLinearAdd, ...: the INT8 kernels ONNX Runtime's CPU
    provider runs) rather than QDQ, whose Quantize/Dequantize pair per activation and Dequantize per weight and
    bias ONNX Runtime fuses into those same kernels when it loads the file anyway (docs/deploy.md)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared))
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8)
        else:
            quantize_static(str(prepared), str(out_path), _calibration_reader(prepared, calibration),
                            quant_format=QuantFormat.QOperator, per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8)


def quantize_checked(float_path: str | Path, out_path: str | Path, gate: QuantizationGate) -> dict[str, Any]:
    """Quantize (see ``quantize``) and compare INT8 with float on the gate's inputs; QuantizationError naming both
    deltas and both limits when the INT8 model is beyond them. Returns the quantization report."""
    quantize(float_path, out_path, gate.mode, gate.calibration)
    before = onnx_class_metrics(float_path, gate.x, gate.y, gate.num_classes)
    after = onnx_class_metrics(out_path, gate.x, gate.y, gate.num_classes)
    acc_drop, cwv_rise = before["acc"] - after["acc"], after["cwv"] - before["cwv"]
    if not (acc_drop <= gate.max_acc_drop and cwv_rise <= gate.max_cwv_rise):
        raise QuantizationError(
            f"the {gate.mode} INT8 model is refused: accuracy drop {acc_drop:.4f} (limit export.max_quant_acc_drop "
            f"{gate.max_acc_drop}), CWV rise {cwv_rise:.5f} (limit export.max_quant_cwv_rise {gate.max_cwv_rise}) "
            f"on {len(gate.y)} test inputs")
    return {"mode": gate.mode, "float": before, "int8": after, "acc_drop": acc_drop, "cwv_rise": cwv_rise,
            "max_acc_drop": gate.max_acc_drop, "max_cwv_rise": gate.max_cwv_rise, "samples": int(len(gate.y))}


def _calibration_reader(model_path: Path, inputs: np.ndarray | None) -> Any:
    """``inputs`` in fixed-size batches, as onnxruntime.quantization's calibrator reads them."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    name = onnx.load_model(str(model_path), load_external_data=False).graph.input[0].name
    data = np.ascontiguousarray(inputs, dtype=np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([data[i:i + CALIBRATION_BATCH] for i in range(0, len(data), CALIBRATION_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    return Reader()
