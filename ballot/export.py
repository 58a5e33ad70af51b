"""Bake masks into the weights, export to ONNX (with metadata; compact or dense storage, optionally INT8), and check
numeric parity with PyTorch."""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from ballot.compact import remove_dead_units
from ballot.config import ExperimentConfig
from ballot.errors import ModelError, ParityError, StorageError, UntraceableModelError
from ballot.masks import Mask, prunable_names
from ballot.packing import FLOAT_BYTES, lossless_floor_bytes, minify, pack_sparse_initializers, strip_debug_info
from ballot.storage import atomic_write

if TYPE_CHECKING:
    from ballot.data import DataBundle
    from ballot.quantize import QuantizationGate

INPUT_NAME, OUTPUT_NAME = "input", "logits"
CARD_METRICS = ("density", "acc", "cwv", "mcd", "worst_class")


def bake(model: nn.Module, mask: Mask | None) -> nn.Module:
    """An eval-mode copy of ``model`` on the CPU with pruned weights set to exactly zero."""
    baked = copy.deepcopy(model).cpu().eval()
    if mask is not None:
        mask.apply(baked)
    return baked


# Warnings torch.export prints while tracing an LSTM: a deprecation inside its own generated code, and the LSTM's
# flattened weight list, which it stores as constants (the exported weights are the model's, as the parity check shows)
EXPORTER_NOISE = ("_check_is_size will be removed", "The tensor attributes .*_flat_weights")


def onnx_proto(model: nn.Module, input_shape: Sequence[int], metadata: dict[str, Any] | None = None) -> Any:
    """``model`` as an ONNX ModelProto with a dynamic batch axis; ``metadata`` goes into metadata_props."""
    for name, module in model.named_modules():
        if isinstance(module, nn.LSTM) and module.proj_size > 0:
            raise ModelError(f"layer '{name}': PyTorch's ONNX exporter writes an LSTM with proj_size > 0 that ONNX "
                             "Runtime cannot run (its cell state takes the projected size); use proj_size=0")
    model = copy.deepcopy(model).cpu().eval()
    example = torch.rand(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():  # PyTorch's notes to its own developers, not to a user (recurrent layers)
        for message in EXPORTER_NOISE:
            warnings.filterwarnings("ignore", message=message)
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    if not proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
        raise ModelError("the model's forward fixes the batch size, so its ONNX graph would accept batches of "
                         f"{len(example)} only: take the batch size as x.shape[0] (not len(x)) or reshape with -1")
    set_metadata(proto, metadata or {})
    return proto


def set_metadata(proto: Any, metadata: dict[str, Any]) -> None:
    """Replace the metadata_props of ``proto`` with ``metadata`` (JSON values)."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def save_proto(proto: Any, path: str | Path) -> None:
    """Check ``proto`` and write it to ``path`` (as it is: callers give a temp path or wrap in atomic_write)."""
    import onnx

    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: str | Path,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis; ``metadata`` goes into metadata_props (JSON values)."""
    proto = onnx_proto(model, input_shape, metadata)
    return atomic_write(path, lambda tmp: save_proto(proto, tmp))


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
    refusal = f"'{path}' is not an ONNX file written by `ballot export`"
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
        metadata = {p.key: json.loads(p.value) for p in proto.metadata_props}
    except (DecodeError, json.JSONDecodeError, OSError, ValueError) as error:
        raise StorageError(f"{refusal}: {error}") from None
    if not (proto.graph.node and proto.opset_import):  # an empty file parses as an empty model
        raise StorageError(f"{refusal}: it has no graph nodes or no opset import")
    return metadata


def check_parity(model: nn.Module, onnx_path: str | Path, inputs: torch.Tensor) -> dict[str, float]:
    """Max / mean absolute logit difference, the max difference scaled by 1 + |PyTorch's logit| (what
    export.parity_tolerance bounds) and argmax agreement of ONNX Runtime vs PyTorch on ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.cpu().eval()(inputs.cpu()).numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.cpu().numpy().astype(np.float32)})[0]
    diff = np.abs(expected - got)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_scaled_diff": float((diff / (1 + np.abs(expected))).max()),
            "argmax_agreement": float((expected.argmax(1) == got.argmax(1)).mean()), "samples": int(len(inputs))}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Float values the model stores (parameters and buffers: what its ONNX graph holds as weights, packed or not)
    and how many of them are non-zero."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    return {"onnx_parameters": int(sum(t.numel() for t in tensors)),
            "onnx_nonzero_parameters": int(sum(int(torch.count_nonzero(t)) for t in tensors))}


def storage_floor(baked: nn.Module) -> int:
    """The lossless floor of ``baked``: float32 for every non-zero prunable weight and every other float value
    (biases, BatchNorm, input statistics), plus one bit per prunable weight."""
    params = dict(baked.named_parameters())
    prunable = [params[name] for name in prunable_names(baked)]
    other = parameter_counts(baked)["onnx_parameters"] - sum(w.numel() for w in prunable)
    return lossless_floor_bytes(int(sum(int(torch.count_nonzero(w)) for w in prunable)) + other,
                                sum(w.numel() for w in prunable))


def export_checked(baked: nn.Module, input_shape: Sequence[int], path: str | Path, card: dict[str, Any],
                   inputs: torch.Tensor, tolerance: float, compact: bool = True, granularity: str = "weight",
                   quantization: QuantizationGate | None = None) -> dict[str, Any]:
    """Export ``baked`` (see ``bake``) with ``card`` as metadata and check it on ``inputs``; ``path`` is replaced
    only when ONNX Runtime agrees with PyTorch within ``tolerance`` (else ParityError) and, with ``quantization``,
    when the INT8 model passes its gate (else QuantizationError; the INT8 file is then what is written, its card
    carrying the INT8 metrics).

    ``compact`` removes dead units (ballot.compact; skipped, with the reason under ``dead_units_kept``, on a model
    Torch-Pruning cannot trace), packs the sparse weights and minifies the graph
    (ballot.packing; the INT8 file alike, checked against the quantizer's own file on ``inputs``). The metadata
    also records ``onnx_format`` ("compact" when weights are packed, else "dense"), ``granularity`` and
    ``quantization``. Returns the export report: parity, sizes (the file, the plain dense export, the lossless
    floor), removed units, packed tensors, parameter counts and the quantization report."""
    deployed, removed, untraced = baked, {}, None
    if compact:
        try:
            deployed, removed = remove_dead_units(baked, input_shape)
        except UntraceableModelError as error:  # removal is an optimisation: packing and parity still hold
            untraced = str(error)
    plain = onnx_proto(deployed, input_shape)
    proto, packed = plain, []
    if compact:
        proto = copy.deepcopy(plain)
        strip_debug_info(proto)
        # every initializer, not the prunable weights' names: the exporter folds some weights (a linear layer on
        # 3-D inputs, attention's projections) into transposed copies under new names
        packed = pack_sparse_initializers(proto, [init.name for init in proto.graph.initializer])
        proto = minify(proto)
    fields = {"onnx_format": "compact" if packed else "dense", "granularity": granularity}
    metadata = {**card, **fields, "quantization": "none"}  # the float file's; the INT8 file's says its mode
    set_metadata(plain, metadata)
    set_metadata(proto, metadata)
    removed_values = parameter_counts(baked)["onnx_parameters"] - parameter_counts(deployed)["onnx_parameters"]
    report: dict[str, Any] = {"dense_onnx_bytes": plain.ByteSize() + FLOAT_BYTES * removed_values,
                              "lossless_floor_bytes": storage_floor(baked), "removed_units": removed,
                              "packed_tensors": packed, **fields}
    if untraced:
        report["dead_units_kept"] = untraced

    def write(tmp: str) -> None:
        save_proto(proto, tmp)
        parity = check_parity(baked, tmp, inputs)
        if not parity["max_scaled_diff"] <= tolerance:
            raise ParityError(f"ONNX Runtime differs from PyTorch by {parity['max_abs_diff']:.3g} on "
                              f"{parity['samples']} test inputs, {parity['max_scaled_diff']:.3g} x (1 + |logit|) "
                              f"(export.parity_tolerance {tolerance})")
        report.update(parity=parity, parity_tolerance=tolerance)
        if quantization is not None:
            quant, int8_packed = _quantized(plain, tmp, quantization, {**metadata, "quantization": quantization.mode},
                                            compact, inputs, tolerance)
            report.update(quantization=quant, packed_tensors=int8_packed,
                          onnx_format="compact" if int8_packed else "dense")
        report["onnx_bytes"] = Path(tmp).stat().st_size

    atomic_write(path, write)
    report.update(parameter_counts(deployed))
    return report


def export_run(model: nn.Module, mask: Mask | None, data: DataBundle, cfg: ExperimentConfig,
               metrics: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """A pruned run as its deployed ONNX file, as the export.* settings say: masks baked in, the card from
    ``metrics``, parity on the first test inputs, compact storage and the optional INT8 gate (its calibration
    rows drawn with base.seed)."""
    from ballot.quantize import gate_for

    card = model_card(metrics, cfg, data.class_names, data.input_shape)
    return export_checked(bake(model, mask), data.input_shape, path, card, data.test.x[:cfg.export.parity_samples],
                          cfg.export.parity_tolerance, compact=cfg.export.compact,
                          granularity=cfg.prune.granularity, quantization=gate_for(cfg.export, data, cfg.base.seed))


def describe(report: dict[str, Any]) -> list[str]:
    """The export report in a line or two: parity, format, size against the dense file and the lossless floor."""
    parity = report["parity"]
    lines = [f"export: parity max |diff| {parity['max_abs_diff']:.2e} on {parity['samples']} test inputs, argmax "
             f"agreement {parity['argmax_agreement']:.4f}; {report['onnx_format']} {report['onnx_bytes']:,} bytes "
             f"({report['onnx_bytes'] / report['dense_onnx_bytes']:.3f}x dense, "
             f"{report['onnx_bytes'] / report['lossless_floor_bytes']:.2f}x lossless floor)"]
    if "dead_units_kept" in report:
        lines.insert(0, f"export: dead units not removed (the weights are still packed): {report['dead_units_kept']}")
    if "quantization" in report:
        quant = report["quantization"]
        lines.append(f"export: {quant['mode']} INT8 accuracy {quant['float']['acc']:.4f} -> {quant['int8']['acc']:.4f},"
                     f" CWV {quant['float']['cwv']:.5f} -> {quant['int8']['cwv']:.5f}")
    return lines


def _quantized(plain: Any, tmp: str, gate: QuantizationGate, metadata: dict[str, Any], compact: bool,
               inputs: torch.Tensor, tolerance: float) -> tuple[dict[str, Any], list[str]]:
    """Quantize the dense float graph ``plain`` (the quantizer needs initializers, not packed weights), gate it,
    and write the INT8 model over the float file at ``tmp`` with the INT8 metrics in its card; with ``compact``
    its sparse INT8 weights are packed and the graph minified (ballot.packing), checked against the quantizer's
    file on ``inputs``. Returns the quantization report (with the sizes of the float file ``tmp`` held and of the
    INT8 file) and the packed tensors."""
    import onnx

    from ballot.quantize import quantize_checked

    with tempfile.TemporaryDirectory() as folder:
        float_path, int8_path = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        dense = copy.deepcopy(plain)
        strip_debug_info(dense)
        save_proto(dense, float_path)
        result = quantize_checked(float_path, int8_path, gate)
        int8 = onnx.load_model(str(int8_path))
        result["float_onnx_bytes"] = Path(tmp).stat().st_size
        strip_debug_info(int8)
        packed = pack_sparse_initializers(int8, [init.name for init in int8.graph.initializer]) if compact else []
        int8 = minify(int8) if compact else int8
        set_metadata(int8, {**metadata, **result["int8"], "onnx_format": "compact" if packed else "dense"})
        save_proto(int8, tmp)
        if compact:
            diff = _max_output_diff(int8_path, tmp, inputs)
            if not diff <= tolerance:
                raise ParityError(f"the compact INT8 model differs from the quantizer's by {diff:.3g} on "
                                  f"{len(inputs)} test inputs (export.parity_tolerance {tolerance})")
            result["packed_max_abs_diff"] = diff
    result["int8_onnx_bytes"] = Path(tmp).stat().st_size
    return result, packed


def _max_output_diff(first: str | Path, second: str | Path, inputs: torch.Tensor) -> float:
    """Max absolute difference of the logits two ONNX files give for ``inputs`` in ONNX Runtime."""
    import onnxruntime as ort

    x = inputs.cpu().numpy().astype(np.float32)
    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (first, second)]
    outputs = [session.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for session in sessions]
    return float(np.abs(outputs[0] - outputs[1]).max())
