"""Packed storage of sparse weights inside an ONNX graph that ONNX Runtime loads as it is.

The sparse initializers of one element type (float32, or the integer weights and zero points of a quantized model)
are concatenated (row-major) and stored as the non-zero values (in that type) plus their positions, in whichever of
two forms is smaller:

- **gaps** (below about 1/8 density): the distance of each value from the previous one, one uint8 each (a gap
  over 255 is bridged by zero-valued entries 255 apart), rebuilt as
  ``ScatterElements(ConstantOfShape(n, 0), CumSum(gaps) - 1, values)``;
- **bitmask**: one bit per weight (``np.packbits``), rebuilt as ``Where(mask, Gather(values, CumSum(mask) - 1), 0)``
  after BitShift + BitwiseAnd unpack the bits.

Then ``W_1, W_2, ... = Reshape(Split(dense), shape_i)``. Every input of that subgraph is an initializer, so ONNX
Runtime constant-folds it when it creates the session and runs the original dense ops at dense speed (NonZero would
be shorter, but is not folded). ONNX's own ``sparse_initializer`` was not used: its int64 (int32) indices cost 8 (4)
bytes per non-zero, where a gap costs 1 and the bitmask 1/8 byte per weight.

``strip_debug_info`` and ``minify`` drop the bytes of a compact file that carry no meaning: the exporter's debug
info, node names, duplicate small initializers, unused opset imports and long internal tensor names.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import numpy as np

FLOAT_BYTES = 4
PACKABLE_TYPES = ("FLOAT", "INT8", "UINT8", "INT32")  # onnx.TensorProto element types packing handles
MIN_OPSET = 18  # BitwiseAnd
MAX_GAP = 255  # uint8 gaps
PER_TENSOR_BYTES = 64  # about what a packed tensor's split output, Reshape and shape constant add to the file


def lossless_floor_bytes(kept_values: int, prunable_weights: int) -> int:
    """float32 for every kept value plus one bit per prunable weight: the reference size of exact storage (a
    bitmask's; gaps go below it at low density)."""
    return FLOAT_BYTES * kept_values + math.ceil(prunable_weights / 8)


def strip_debug_info(proto: Any) -> None:
    """Drop what the exporter adds for debugging only: per-node metadata (source paths, FX names, stack traces),
    doc strings, the graph's and its inputs' and outputs' metadata (torch.export's graph signature: about 9 KB for
    resnet20) and intermediate value_info (shapes ONNX Runtime infers again)."""
    graph = proto.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.ClearField("doc_string")
    for value in [*graph.input, *graph.output]:
        del value.metadata_props[:]
    del graph.metadata_props[:]
    del graph.value_info[:]


def minify(proto: Any) -> Any:
    """A copy of ``proto`` that computes the same with fewer bytes: identical small initializers shared (the
    quantizer writes a zero point per tensor) and unused opset imports dropped (both onnx_ir passes), node names
    cleared (optional in ONNX) and every tensor name but the graph's inputs and outputs (what the service and its
    clients use) replaced by a short base-36 one. Debug info is ``strip_debug_info``'s job."""
    import onnx_ir as ir
    from onnx_ir.passes.common import DeduplicateInitializersPass, RemoveUnusedOpsetsPass

    model = ir.from_proto(copy.deepcopy(proto))  # onnx_ir's tensors wrap the proto's: renaming would rename those
    ir.passes.Sequential(DeduplicateInitializersPass(), RemoveUnusedOpsetsPass())(model)
    graph = model.graph
    kept = {*graph.inputs, *graph.outputs}
    taken = {value.name for sub in model.graphs() for node in sub for value in [*node.inputs, *node.outputs] if value}
    taken |= {value.name for value in [*kept, *graph.initializers.values()]}
    fresh = (name for name in (np.base_repr(i, 36).lower() for i in itertools.count()) if name not in taken)
    for value in [*graph.initializers.values(), *(out for node in graph for out in node.outputs)]:
        if value.name and value not in kept:  # an omitted optional output stays unnamed
            value.name = next(fresh)
    for node in graph:
        node.name = None
    minified = ir.to_proto(model)
    del minified.graph.value_info[:]  # onnx_ir lists the initializers' types there; ONNX Runtime does not need them
    return minified


def pack_sparse_initializers(proto: Any, names: list[str]) -> list[str]:
    """Rewrite, in place, those initializers among ``names`` (of PACKABLE_TYPES) that are smaller packed than
    dense, one packed pair per element type; returns the names packed (none when packing would not make the file
    smaller, or the model is below opset 18)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        return []
    graph, wanted = proto.graph, set(names)
    packed: list[str] = []
    for type_name in PACKABLE_TYPES:
        chosen = [init for init in graph.initializer if init.name in wanted
                  and init.data_type == getattr(TensorProto, type_name)
                  and init.data_location != TensorProto.EXTERNAL and _worth_packing(numpy_helper.to_array(init))]
        if chosen and _pack(graph, chosen):
            packed += [init.name for init in chosen]
    if packed:
        onnx.checker.check_model(proto)
    return packed


def _pack(graph: Any, chosen: list[Any]) -> bool:
    """Replace the initializers ``chosen`` (one element type) of ``graph`` by their packed form when that is
    smaller; whether it was."""
    from onnx import numpy_helper

    tensors, nodes = _rebuild([(init.name, numpy_helper.to_array(init)) for init in chosen], _free_prefix(graph))
    if sum(t.ByteSize() for t in tensors) + sum(n.ByteSize() for n in nodes) >= sum(i.ByteSize() for i in chosen):
        return False
    names = {init.name for init in chosen}
    rest = [init for init in graph.initializer if init.name not in names]
    del graph.initializer[:]
    graph.initializer.extend([*tensors, *rest])
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *old_nodes])  # the rebuilt weights first: the graph stays topologically sorted
    return True


def _free_prefix(graph: Any) -> str:
    """A short name prefix (the names recur in every node of the subgraph) that no tensor of ``graph`` uses."""
    names = {i.name for i in graph.initializer} | {v.name for v in [*graph.input, *graph.output]}
    names |= {name for node in graph.node for name in [*node.input, *node.output]}
    return next(prefix for prefix in (f"p{i}" if i else "p" for i in range(len(names) + 1))
                if not any(name.startswith(f"{prefix}.") for name in names))


def _worth_packing(weight: np.ndarray) -> bool:
    """Values + positions (gaps or bits, about) + the tensor's share of the subgraph below its dense bytes."""
    width, kept = weight.dtype.itemsize, int(np.count_nonzero(weight))
    return width * kept + min(kept, weight.size / 8) + PER_TENSOR_BYTES < width * weight.size


def _rebuild(weights: list[tuple[str, np.ndarray]], prefix: str) -> tuple[list[Any], list[Any]]:
    """The initializers and nodes (their tensors named ``prefix``.*) that rebuild each (name, array) of
    ``weights`` (one element type) under its name: the smaller of the gap and bitmask forms, then Split + Reshape."""
    from onnx import helper, numpy_helper

    flat = np.concatenate([w.reshape(-1) for _, w in weights])
    forms = [_gap_form(flat, prefix), _bitmask_form(flat, prefix)]
    tensors, nodes = min(forms, key=lambda form: sum(part.ByteSize() for part in [*form[0], *form[1]]))
    tensors.append(numpy_helper.from_array(np.array([w.size for _, w in weights], np.int64), f"{prefix}.split"))
    parts = [f"{prefix}.{i}" for i in range(len(weights))]
    nodes.append(helper.make_node("Split", [f"{prefix}.dense", f"{prefix}.split"], parts, axis=0))
    for part, (name, weight) in zip(parts, weights):
        tensors.append(numpy_helper.from_array(np.array(weight.shape, np.int64), f"{part}.shape"))
        nodes.append(helper.make_node("Reshape", [part, f"{part}.shape"], [name]))
    return tensors, nodes


def _gap_form(flat: np.ndarray, prefix: str) -> tuple[list[Any], list[Any]]:
    """``flat`` as values + uint8 gaps, and the nodes that scatter them into ``prefix``.dense."""
    from onnx import TensorProto, helper, numpy_helper

    positions = np.flatnonzero(flat)
    if not len(positions):
        positions = np.zeros(1, dtype=np.int64)  # one (zero) value: ScatterElements needs something to write
    gaps = np.diff(positions, prepend=-1)
    bridges = (gaps - 1) // MAX_GAP  # zero-valued entries MAX_GAP apart in front of each long gap
    last = np.cumsum(bridges + 1) - 1
    stored_gaps = np.full(last[-1] + 1, MAX_GAP, dtype=np.uint8)
    stored_gaps[last] = gaps - MAX_GAP * bridges
    values = np.zeros(last[-1] + 1, dtype=flat.dtype)
    values[last] = flat[positions]

    def t(name: str) -> str:
        return f"{prefix}.{name}"

    tensors = [numpy_helper.from_array(values, t("values")), numpy_helper.from_array(stored_gaps, t("gaps")),
               numpy_helper.from_array(np.array(0, np.int64), t("axis")),
               numpy_helper.from_array(np.array(1, np.int64), t("step")),
               numpy_helper.from_array(np.array([flat.size], np.int64), t("size"))]
    nodes = [helper.make_node("Cast", [t("gaps")], [t("gaps64")], to=TensorProto.INT64),
             helper.make_node("CumSum", [t("gaps64"), t("axis")], [t("end")]),
             helper.make_node("Sub", [t("end"), t("step")], [t("index")]),
             helper.make_node("ConstantOfShape", [t("size")], [t("zeros")],
                              value=numpy_helper.from_array(np.zeros(1, dtype=flat.dtype))),
             helper.make_node("ScatterElements", [t("zeros"), t("index"), t("values")], [t("dense")], axis=0)]
    return tensors, nodes


def _bitmask_form(flat: np.ndarray, prefix: str) -> tuple[list[Any], list[Any]]:
    """``flat`` as values + a bitmask, and the nodes that spread them into ``prefix``.dense."""
    from onnx import TensorProto, helper, numpy_helper

    mask = flat != 0
    values = flat[mask] if mask.any() else np.zeros(1, dtype=flat.dtype)  # Gather needs one value to index

    def const(name: str, value: Any, dtype: Any = np.int64) -> Any:
        return numpy_helper.from_array(np.array(value, dtype=dtype), f"{prefix}.{name}")

    def t(name: str) -> str:
        return f"{prefix}.{name}"

    tensors = [numpy_helper.from_array(values, t("values")),
               numpy_helper.from_array(np.packbits(mask).reshape(-1, 1), t("bits")),
               const("shifts", np.arange(7, -1, -1).reshape(1, 8), np.uint8), const("one", 1, np.uint8),
               const("flat", [-1]), const("zero_index", [0]), const("axis", 0), const("step", 1),
               const("size", [flat.size]), const("zero", 0, flat.dtype)]
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
    return tensors, nodes
