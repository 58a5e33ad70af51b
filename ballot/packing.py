"""Packed storage of sparse weights inside an ONNX graph that ONNX Runtime loads as it is.

The sparse float32 initializers are concatenated (row-major) and stored as two: the non-zero values (float32) and
a bitmask of where they go (``np.packbits``, one bit per weight). Standard ops (opset >= 18) rebuild them::

    bits [m, 1] --BitShift(RIGHT, [7..0])--> [m, 8] --BitwiseAnd(1)--> Reshape(-1) --Slice(0, n)--> mask (bool)
    dense = Where(mask, Gather(values, CumSum(mask) - 1), 0);  W_1, W_2, ... = Reshape(Split(dense), shape_i)

Every input of that subgraph is an initializer, so ONNX Runtime constant-folds it when it creates the session and
runs the original dense ops at dense speed (NonZero + ScatterElements would be shorter but is not folded). ONNX's
own ``sparse_initializer`` was not used: its int64 (int32) indices cost 8 (4) bytes per non-zero next to the 4 of
the value, where the bitmask costs 1/8 byte per weight, less for any density above 1/64 (1/32).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FLOAT_BYTES = 4
MIN_OPSET = 18  # BitwiseAnd
PER_TENSOR_BYTES = 64  # about what a packed tensor's split output, Reshape and shape constant add to the file


def lossless_floor_bytes(kept_values: int, prunable_weights: int) -> int:
    """float32 for every kept value plus one bit per prunable weight: what any exact storage must spend."""
    return FLOAT_BYTES * kept_values + math.ceil(prunable_weights / 8)


def strip_debug_info(proto: Any) -> None:
    """Drop what the exporter adds for debugging only: per-node metadata (source paths, FX names, stack traces),
    doc strings and intermediate value_info (shapes ONNX Runtime infers again)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.ClearField("doc_string")
    del proto.graph.value_info[:]


def pack_sparse_initializers(proto: Any, names: list[str]) -> list[str]:
    """Rewrite, in place, those float32 initializers among ``names`` that are smaller packed than dense; returns
    the names packed (none when packing would not make the file smaller, or the model is below opset 18)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    graph = proto.graph
    chosen = [init for init in graph.initializer if init.name in set(names) and init.data_type == TensorProto.FLOAT
              and init.data_location != TensorProto.EXTERNAL and _worth_packing(numpy_helper.to_array(init))]
    if opset < MIN_OPSET or not chosen:
        return []
    tensors, nodes = _rebuild([(init.name, numpy_helper.to_array(init)) for init in chosen], _free_prefix(graph))
    saved = sum(init.ByteSize() for init in chosen)
    if sum(t.ByteSize() for t in tensors) + sum(n.ByteSize() for n in nodes) >= saved:
        return []
    packed = [init.name for init in chosen]
    rest = [init for init in graph.initializer if init.name not in set(packed)]
    del graph.initializer[:]
    graph.initializer.extend([*tensors, *rest])
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *old_nodes])  # the rebuilt weights first: the graph stays topologically sorted
    onnx.checker.check_model(proto)
    return packed


def _free_prefix(graph: Any) -> str:
    """A short name prefix (the names recur in every node of the subgraph) that no tensor of ``graph`` uses."""
    names = {i.name for i in graph.initializer} | {v.name for v in [*graph.input, *graph.output]}
    names |= {name for node in graph.node for name in [*node.input, *node.output]}
    return next(prefix for prefix in (f"p{i}" if i else "p" for i in range(len(names) + 1))
                if not any(name.startswith(f"{prefix}.") for name in names))


def _worth_packing(weight: np.ndarray) -> bool:
    """Values + bits + the tensor's share of the subgraph below its dense bytes."""
    return FLOAT_BYTES * int(np.count_nonzero(weight)) + weight.size / 8 + PER_TENSOR_BYTES < FLOAT_BYTES * weight.size


def _rebuild(weights: list[tuple[str, np.ndarray]], prefix: str) -> tuple[list[Any], list[Any]]:
    """The initializers and nodes (their tensors named ``prefix``.*) that rebuild each (name, array) of
    ``weights`` under its name."""
    from onnx import TensorProto, helper, numpy_helper

    flat = np.concatenate([w.reshape(-1) for _, w in weights]).astype(np.float32)
    mask = flat != 0
    values = flat[mask] if mask.any() else np.zeros(1, dtype=np.float32)  # Gather needs one value to index

    def const(name: str, value: Any, dtype: Any = np.int64) -> Any:
        return numpy_helper.from_array(np.array(value, dtype=dtype), f"{prefix}.{name}")

    def t(name: str) -> str:
        return f"{prefix}.{name}"

    tensors = [numpy_helper.from_array(values, t("values")),
               numpy_helper.from_array(np.packbits(mask).reshape(-1, 1), t("bits")),
               const("shifts", np.arange(7, -1, -1).reshape(1, 8), np.uint8), const("one", 1, np.uint8),
               const("flat", [-1]), const("zero_index", [0]), const("axis", 0), const("step", 1),
               const("size", [flat.size]), const("zero", 0, np.float32)]
    nodes = [helper.make_node("BitShift", [t("bits"), t("shifts")], [t("shifted")], direction="RIGHT"),
             helper.make_node("BitwiseAnd", [t("shifted"), t("one")], [t("bit")]),
             helper.make_node("Reshape", [t("bit"), t("flat")], [t("bitflat")]),
             helper.make_node("Slice", [t("bitflat"), t("zero_index"), t("size")], [t("bitrow")]),
             helper.make_node("Cast", [t("bitrow")], [t("mask")], to=TensorProto.BOOL),
             helper.make_node("Cast", [t("bitrow")], [t("count")], to=TensorProto.INT64),
             helper.make_node("CumSum", [t("count"), t("axis")], [t("rank")]),
             helper.make_node("Sub", [t("rank"), t("step")], [t("index")]),
             helper.make_node("Gather", [t("values"), t("index")], [t("spread")], axis=0),
             helper.make_node("Where", [t("mask"), t("spread"), t("zero")], [t("dense")])]
    tensors.append(const("split", [w.size for _, w in weights]))
    parts = [t(f"{i}") for i in range(len(weights))]
    nodes.append(helper.make_node("Split", [t("dense"), t("split")], parts, axis=0))
    for part, (name, weight) in zip(parts, weights):
        tensors.append(const(f"{part}.shape", weight.shape))
        nodes.append(helper.make_node("Reshape", [part, t(f"{part}.shape")], [name]))
    return tensors, nodes
