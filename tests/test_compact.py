"""Dead-unit removal: exactly the dead or unread units go, and the outputs do not move."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ballot.compact import remove_dead_units
from ballot.models import build_model

SHAPE = (1, 8, 8)


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so a zero conv output is not a zero BN output."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _same_outputs(before: nn.Module, after: nn.Module) -> None:
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = before.eval()(x), after.eval()(x)
    assert torch.allclose(expected, got, atol=1e-5, rtol=0), (expected - got).abs().max()


@torch.no_grad()
def test_mlp_loses_dead_and_unread_neurons_but_keeps_a_constant_one():
    model = build_model("mlp", SHAPE, 10).eval()
    first, second, head = model[1][1], model[1][3], model[1][5]
    first.weight[3] = 0; first.bias[3] = 0          # dead: zero in, zero bias
    first.weight[5] = 0; first.bias[5] = -0.5       # dead after the ReLU: constant -0.5 clamped to 0
    first.weight[9] = 0; first.bias[9] = 0.5        # constant 0.5 that the next layer reads: must stay
    second.weight[:, 11] = 0                        # unread: no consumer weight on it
    head.weight[:, 7] = 0                           # unread by the classifier
    compact, removed = remove_dead_units(model, SHAPE, channel_multiple=1)
    assert removed == {"1.1": 3, "1.3": 1}
    assert compact[1][1].out_features == 297 and compact[1][3].in_features == 297
    assert compact[1][5].out_features == 10, "the classifier's outputs are never removed"
    _same_outputs(model, compact)


@torch.no_grad()
def test_nothing_dead_leaves_the_model_as_it_is():
    model = build_model("cnn", SHAPE, 10).eval()
    compact, removed = remove_dead_units(model, SHAPE, channel_multiple=1)
    assert removed == {}
    assert [p.shape for p in compact.parameters()] == [p.shape for p in model.parameters()]


@torch.no_grad()
def test_cnn_channels_through_pooling_and_flatten():
    model = build_model("cnn", SHAPE, 10).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    convs[0].weight[4] = 0; convs[0].bias[4] = 0    # dead channel before a max-pool-free block
    convs[1].weight[2] = 0; convs[1].bias[2] = -1.0  # dead after ReLU, then max-pooled
    convs[3].weight[6] = 0; convs[3].bias[6] = 0.2   # constant through mean -> linear: must stay
    model[1][-1].weight[:, 9] = 0                    # last conv's channel 9 unread through mean + flatten
    compact, removed = remove_dead_units(model, SHAPE, channel_multiple=1)
    assert removed == {"1.0": 1, "1.2": 1, "1.7": 1}
    assert model[1][-1].in_features == 64 and compact[1][-1].in_features == 63
    _same_outputs(model, compact)


@torch.no_grad()
def test_resnet20_residual_coupled_channel_goes_only_when_every_member_allows_it():
    model = build_model("resnet20", SHAPE, 10).eval()
    _randomise_norms(model)
    net = model[1]
    # stage 1 (16 channels) is one group: stem, three blocks' conv2/bn2 and adds, the consumers conv1 of each
    # block and the next stage's conv1 and shortcut. Channel 5 is unread by all of them.
    for block in (net[3], net[4], net[5]):
        block.conv1.weight[:, 5] = 0
    net[6].conv1.weight[:, 5] = 0
    net[6].shortcut[0].weight[:, 5] = 0
    # channel 8: unread by every consumer but one (the next stage's shortcut): must stay
    for block in (net[3], net[4], net[5]):
        block.conv1.weight[:, 8] = 0
    net[6].conv1.weight[:, 8] = 0
    # inside block 1.4 (conv1 -> bn1 -> relu -> conv2): channel 2 dead by a zero BN (scale and shift 0),
    # channel 3 by zero conv weights and a BN whose constant is negative before the ReLU
    net[4].bn1.weight[2] = 0; net[4].bn1.bias[2] = 0
    net[4].conv1.weight[3] = 0; net[4].bn1.bias[3] = -1.0
    # channel 4: zero BN scale but shift 0.3, a constant the block's conv2 reads: must stay
    net[4].bn1.weight[4] = 0; net[4].bn1.bias[4] = 0.3
    compact, removed = remove_dead_units(model, SHAPE, channel_multiple=1)
    assert removed == {"1.0": 1, "1.3.conv2": 1, "1.4.conv1": 2, "1.4.conv2": 1, "1.5.conv2": 1}
    assert compact[1][6].shortcut[0].in_channels == 15 and compact[1][4].bn1.num_features == 14
    _same_outputs(model, compact)


@torch.no_grad()
def test_convolutions_keep_a_multiple_of_eight_channels_and_linear_layers_lose_every_dead_unit():
    model = build_model("cnn", SHAPE, 10).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv, dead in zip(convs, (3, 0, 0, 10)):  # of 32, 32, 64, 64 channels
        conv.weight[:dead] = 0
        conv.bias[:dead] = 0
    compact, removed = remove_dead_units(model, SHAPE)
    assert removed == {"1.7": 8}, "29 of 32 live: all 32 kept; 54 of 64 live: 56 kept"
    _same_outputs(model, compact)
    mlp = build_model("mlp", SHAPE, 10).eval()
    mlp[1][1].weight[:3] = 0
    mlp[1][1].bias[:3] = 0
    assert remove_dead_units(mlp, SHAPE)[1] == {"1.1": 3}


@pytest.mark.parametrize("how", ["frozen", "inference_mode"])
def test_removal_is_the_same_for_a_frozen_model_and_under_inference_mode(how):
    model = build_model("cnn", SHAPE, 10).eval()
    with torch.no_grad():
        for conv, dead in zip([m for m in model.modules() if isinstance(m, nn.Conv2d)], (3, 0, 0, 10)):
            conv.weight[:dead] = 0
            conv.bias[:dead] = 0
    trainable = remove_dead_units(model, SHAPE, channel_multiple=1)[1]
    assert trainable == {"1.0": 3, "1.7": 10}, trainable
    if how == "frozen":
        model.requires_grad_(False)
        compact, removed = remove_dead_units(model, SHAPE, channel_multiple=1)
        assert not any(p.requires_grad for p in model.parameters()), "the caller's model stays frozen"
    else:
        with torch.inference_mode():
            compact, removed = remove_dead_units(model, SHAPE, channel_multiple=1)
    assert removed == trainable
    assert not any(p.is_inference() for p in compact.parameters()), "an ordinary model comes back"
    _same_outputs(model, compact)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@torch.no_grad()
def test_a_layer_whose_units_are_all_dead_keeps_one(name):
    model = build_model(name, SHAPE, 10).eval()
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    first.weight.zero_(); first.bias.zero_()
    compact, _ = remove_dead_units(model, SHAPE, channel_multiple=1)
    assert next(m for m in compact.modules() if isinstance(m, (nn.Linear, nn.Conv2d))).weight.shape[0] == 1
    _same_outputs(model, compact)


# Packed storage and the compact export ---------------------------------------------------------------------------

FMNIST = (1, 28, 28)


def _sparse(name: str, density: float = 0.05) -> nn.Module:
    from ballot.export import bake
    from ballot.masks import Mask, magnitude_scores

    torch.manual_seed(0)
    model = build_model(name, FMNIST, 10)
    return bake(model, Mask.top_k(magnitude_scores(model), density))


def _matmul_graph(weights: dict):
    """x -> MatMul(W1) -> ... : a hand-built graph whose weights are exactly the given arrays."""
    from onnx import TensorProto, helper, numpy_helper

    names = list(weights)
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", name], [f"h{i + 1}"])
             for i, name in enumerate(names)]
    first, last = weights[names[0]], weights[names[-1]]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, first.shape[0]])],
        [helper.make_tensor_value_info(f"h{len(names)}", TensorProto.FLOAT, [None, last.shape[1]])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize("density, form", [(0.03, "gaps"), (0.5, "bits")])
def test_packing_rebuilds_exact_weights_and_skips_those_it_would_not_shrink(density, form):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ballot.packing import MAX_GAP, pack_sparse_initializers

    rng = np.random.default_rng(0)
    sparse = (rng.standard_normal((137, 29)) * (rng.random((137, 29)) < density)).astype(np.float32)  # 3973 bits
    sparse[5:20] = 0  # a run of 435 zeros: a gap over 255
    empty = np.zeros((29, 11), dtype=np.float32)
    dense = rng.standard_normal((11, 5)).astype(np.float32)
    weights = {"sparse": sparse, "empty": empty, "p.values": dense}  # a name the subgraph could take
    proto = _matmul_graph(weights)
    before = proto.ByteSize()
    assert pack_sparse_initializers(proto, list(weights)) == ["sparse", "empty"]
    assert proto.ByteSize() < before
    stored = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert {"p.values", f"p1.{form}"} <= set(stored) and not {"sparse", "empty"} & set(stored), "the smaller form"
    if form == "gaps":
        assert (stored["p1.gaps"] == MAX_GAP).any(), "the long run of zeros is bridged"
    # the rebuilt weights as graph outputs: each must come back exactly (the MatMul chain alone would not show it,
    # as the all-zero weight zeroes its output)
    proto.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, weight.shape)
                              for name, weight in weights.items() if name != "p.values")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    _, got_sparse, got_empty = session.run(None, {"x": rng.standard_normal((4, 137)).astype(np.float32)})
    np.testing.assert_array_equal(got_sparse, sparse)
    np.testing.assert_array_equal(got_empty, empty)
    assert pack_sparse_initializers(_matmul_graph({"w": dense}), ["w"]) == [], "a dense weight is not packed"


def test_int8_weights_are_packed_apart_from_float_ones_and_rebuilt_exactly():
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ballot.packing import pack_sparse_initializers

    rng = np.random.default_rng(1)
    sparse = (rng.standard_normal((40, 30)) * (rng.random((40, 30)) < 0.1)).astype(np.float32)
    quantized = (rng.integers(-127, 128, (30, 200)) * (rng.random((30, 200)) < 0.1)).astype(np.int8)
    scale = np.float32(0.01)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["wq"]),
         helper.make_node("MatMul", ["h", "wq"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 200])],
        [numpy_helper.from_array(sparse, "w"), numpy_helper.from_array(quantized, "q"),
         numpy_helper.from_array(np.array(scale), "scale"),
         numpy_helper.from_array(np.array(0, np.int8), "zero_point")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    before = proto.ByteSize()
    assert pack_sparse_initializers(proto, ["w", "q", "scale", "zero_point"]) == ["w", "q"]
    assert proto.ByteSize() < before
    stored = {i.name: i.data_type for i in proto.graph.initializer}
    assert stored["p.values"] == TensorProto.FLOAT and stored["p1.values"] == TensorProto.INT8, stored
    options = ort.SessionOptions()  # no fusion (DequantizeLinear + MatMul would become an INT8 MatMul): plain math
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = rng.standard_normal((4, 40)).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ sparse @ (quantized.astype(np.float32) * scale), rtol=1e-5, atol=1e-5)


def test_minify_shares_identical_constants_and_shortens_every_name_but_the_inputs_and_outputs():
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ballot.packing import minify

    rng = np.random.default_rng(2)
    weights = [rng.integers(-127, 128, (16, 16)).astype(np.int8) for _ in range(3)]
    nodes, initializers, previous = [], [], "input"
    for i, weight in enumerate(weights):  # per-channel INT8 layers, each with its own copy of the zero points
        initializers += [numpy_helper.from_array(weight, f"layer{i}.weight_quantized"),
                         numpy_helper.from_array(rng.random(16, np.float32) / 100, f"layer{i}.weight_scale"),
                         numpy_helper.from_array(np.zeros(16, np.int8), f"layer{i}.weight_zero_point")]
        output = "logits" if i == len(weights) - 1 else f"layer{i}.output"
        nodes += [helper.make_node("DequantizeLinear", [f"layer{i}.weight_quantized", f"layer{i}.weight_scale",
                                                        f"layer{i}.weight_zero_point"], [f"layer{i}.weight"],
                                   name=f"layer{i}.weight_DequantizeLinear", axis=1),
                  helper.make_node("MatMul", [previous, f"layer{i}.weight"], [output], name=f"layer{i}.MatMul")]
        previous = output
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 16])], initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("ai.onnx.ml", 5)])
    small = minify(proto)
    onnx.checker.check_model(small)
    assert small.ByteSize() < 0.9 * proto.ByteSize(), (small.ByteSize(), proto.ByteSize())
    assert [i.name for i in small.graph.input] == ["input"] and [o.name for o in small.graph.output] == ["logits"]
    assert [o.domain for o in small.opset_import] == [""], "the unused ai.onnx.ml import is dropped"
    assert len(small.graph.initializer) == 7, "one zero point serves the three layers"
    assert not any(node.name for node in small.graph.node)
    names = {name for node in small.graph.node for name in [*node.input, *node.output]} - {"input", "logits"}
    assert max(map(len, names)) == 1, names
    x = rng.standard_normal((4, 16)).astype(np.float32)
    before, after = (ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0] for p in (proto, small))
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("density, form_ops", [(0.05, {"ScatterElements", "CumSum"}), (0.3, {"BitShift", "Where"})])
def test_onnx_runtime_folds_the_packed_subgraph_away(tmp_path, density, form_ops):
    import onnx
    import onnxruntime as ort

    from ballot.export import export_checked

    path = tmp_path / "mlp.onnx"
    export_checked(_sparse("mlp", density), FMNIST, path, {}, torch.rand(8, *FMNIST), 1e-4)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert form_ops <= ops, ops
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    folded = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    packing_ops = {"BitShift", "BitwiseAnd", "CumSum", "Gather", "Where", "ScatterElements", "ConstantOfShape", "Split"}
    assert not folded & packing_ops, folded


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_compact_export_meets_the_size_targets_with_parity(name, tmp_path):
    import onnxruntime as ort

    from ballot.export import export_checked, read_metadata

    baked = _sparse(name)
    card = {"acc": 0.5}
    compact = export_checked(baked, FMNIST, tmp_path / "compact.onnx", card, torch.rand(32, *FMNIST), 1e-4)
    dense = export_checked(baked, FMNIST, tmp_path / "dense.onnx", card, torch.rand(32, *FMNIST), 1e-4, compact=False)
    size = (tmp_path / "compact.onnx").stat().st_size
    assert compact["onnx_bytes"] == size and compact["onnx_format"] == "compact" and dense["onnx_format"] == "dense"
    assert dense["removed_units"] == {} and dense["packed_tensors"] == []
    assert dense["dense_onnx_bytes"] == dense["onnx_bytes"] and "quantization" not in compact
    assert compact["dense_onnx_bytes"] == pytest.approx(dense["onnx_bytes"], rel=0.01), "the estimate of the plain file"
    assert size <= 1.2 * compact["lossless_floor_bytes"], (size, compact["lossless_floor_bytes"])
    assert size <= 0.12 * dense["onnx_bytes"]
    x = torch.rand(64, *FMNIST)
    with torch.no_grad():
        expected = baked(x).numpy()
    got = ort.InferenceSession(str(tmp_path / "compact.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    assert abs(got - expected).max() <= 1e-4
    assert read_metadata(tmp_path / "compact.onnx") == {**card, "onnx_format": "compact", "granularity": "weight",
                                                        "quantization": "none"}


class _Shifted(nn.Module):
    """Linear -> x + 1 -> ReLU -> Linear: a zero unit of the first layer reaches the second as 1."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x) + 1.0))


@torch.no_grad()
def test_a_unit_that_an_added_constant_revives_stays():
    model = _Shifted().eval()
    model.first.weight[2] = 0; model.first.bias[2] = 0
    compact, removed = remove_dead_units(model, (6,))
    assert removed == {}
    x = torch.rand(8, 6)
    assert torch.equal(model(x), compact(x))


class _Tokens(nn.Module):
    """Rows of an image as tokens: a linear embedding on 3-D inputs, one attention layer, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(28, 64)
        self.attend = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attend(self.embed(x.flatten(1, 2))).mean(1))


def test_attention_projections_are_pruned_and_weights_the_exporter_renames_are_packed(tmp_path):
    from ballot.export import bake, export_checked
    from ballot.masks import Mask, magnitude_scores, prunable_names

    torch.manual_seed(0)
    model = _Tokens()
    names = prunable_names(model)
    assert "attend.self_attn.in_proj_weight" in names and "attend.self_attn.out_proj.weight" in names
    mask = Mask.top_k(magnitude_scores(model), 0.05)
    assert mask.counts()["attend.self_attn.in_proj_weight"] < 0.5 * 3 * 64 * 64, "the projection is pruned"
    baked = bake(model, mask)
    compact = export_checked(baked, FMNIST, tmp_path / "compact.onnx", {}, torch.rand(16, *FMNIST), 1e-4)
    dense = export_checked(baked, FMNIST, tmp_path / "dense.onnx", {}, torch.rand(16, *FMNIST), 1e-4, compact=False)
    # the exporter stores these weights transposed under new names; packed by value, the file nears its floor
    assert compact["onnx_bytes"] <= 1.5 * compact["lossless_floor_bytes"], compact
    assert compact["onnx_bytes"] <= 0.2 * dense["onnx_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20", "vgg", "mobilenet", "vit", "lstm"])
def test_every_model_exports_compact_with_parity_at_any_batch_size(name, tmp_path):
    """The parity check feeds 16 inputs to a graph traced on 2: a batch size baked into the graph fails it."""
    import onnxruntime as ort

    from ballot.export import bake, export_checked
    from ballot.masks import Mask, magnitude_scores

    torch.manual_seed(0)
    shape = (3, 16, 16)
    model = build_model(name, shape, 10).eval()
    baked = bake(model, Mask.top_k(magnitude_scores(model), 0.05))
    report = export_checked(baked, shape, tmp_path / "m.onnx", {}, torch.rand(16, *shape), 1e-4)
    assert report["onnx_bytes"] < report["dense_onnx_bytes"] / 4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(5, *shape)
    with torch.no_grad():
        expected = baked(x).numpy()
    assert abs(session.run(None, {"input": x.numpy()})[0] - expected).max() <= 1e-4
