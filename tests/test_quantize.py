"""The fairness-checked INT8 step of the export: a passing model is written with its INT8 metrics, a failing one
leaves nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ballot.config import ConfigError, apply_overrides, experiment_from_params
from ballot.errors import QuantizationError
from ballot.experiment import new_model
from ballot.export import bake, export_checked, read_metadata
from ballot.quantize import QuantizationGate, onnx_class_metrics
from tests.conftest import tiny_config

CARD = {"acc": 0.9, "cwv": 0.01, "mcd": 0.1, "worst_class": 0.8, "dense_acc": 0.92}


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_dense):
    model = new_model(tiny_config(), tiny_data)
    model.load_state_dict(tiny_dense.trained_state)
    return bake(model, None)


def _gate(data, mode: str = "dynamic", acc_drop: float = 0.05, cwv_rise: float = 0.02) -> QuantizationGate:
    return QuantizationGate(mode, acc_drop, cwv_rise, data.test.x.numpy(), data.test.y.numpy(), data.num_classes,
                            data.train.x[:256].numpy())


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_model_within_the_limits_is_written_as_int8_with_its_int8_metrics(trained, tiny_data, tmp_path, mode):
    path = tmp_path / "model.onnx"
    report = export_checked(trained, tiny_data.input_shape, path, CARD, tiny_data.test.x[:64], 1e-4, compact=False,
                            quantization=_gate(tiny_data, mode))
    quant = report["quantization"]
    assert quant["mode"] == mode and quant["acc_drop"] <= 0.05 and quant["cwv_rise"] <= 0.02
    assert quant["acc_drop"] == pytest.approx(quant["float"]["acc"] - quant["int8"]["acc"])
    assert quant["float"]["acc"] > 0.5, "the float model is the trained one"
    card = read_metadata(path)
    assert card["quantization"] == mode and card["onnx_format"] == "dense" and card["dense_acc"] == 0.92
    written = onnx_class_metrics(path, tiny_data.test.x.numpy(), tiny_data.test.y.numpy(), tiny_data.num_classes)
    assert {k: card[k] for k in ("acc", "cwv", "mcd", "worst_class")} == quant["int8"] == written, \
        "the card describes the INT8 file it is written into (static: its metrics differ from the float model's)"
    assert report["onnx_bytes"] == path.stat().st_size == quant["int8_onnx_bytes"]
    if mode == "dynamic":
        assert quant["int8_onnx_bytes"] <= 0.3 * quant["float_onnx_bytes"], quant
    else:
        assert quant["int8"] != quant["float"], "so the card check above tells the two metric sets apart"


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_sparse_int8_model_is_stored_packed_and_computes_what_the_unpacked_one_does(trained, tiny_data, tmp_path,
                                                                                      mode):
    import collections
    import copy

    import onnx
    import onnxruntime as ort

    sparse = copy.deepcopy(trained)
    *hidden, _ = [m for m in sparse.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():  # 5% of each hidden layer in diagonal stripes: every unit keeps inputs and readers
        for layer in hidden:
            rows, cols = torch.meshgrid(*(torch.arange(n) for n in layer.weight.shape), indexing="ij")
            layer.weight.mul_(((rows + cols) % 20 == 0).float())
    args = (sparse, tiny_data.input_shape)
    reports = {compact: export_checked(*args, tmp_path / f"{compact}.onnx", CARD, tiny_data.test.x[:64], 1e-4,
                                       compact=compact, quantization=_gate(tiny_data, mode, 1.0, 1.0))
               for compact in (True, False)}
    packed, plain = reports[True], reports[False]
    for compact, report in reports.items():  # the float file this export would write without INT8, packed or not
        float_path = tmp_path / f"float-{compact}.onnx"
        export_checked(*args, float_path, CARD, tiny_data.test.x[:64], 1e-4, compact=compact)
        assert report["quantization"]["float_onnx_bytes"] == float_path.stat().st_size, compact
    assert packed["onnx_format"] == read_metadata(tmp_path / "True.onnx")["onnx_format"] == "compact"
    assert plain["onnx_format"] == "dense" and plain["packed_tensors"] == []
    weights = [name for name in packed["packed_tensors"] if name.endswith("_quantized")]  # (and zero points)
    assert len(weights) == len(hidden), packed["packed_tensors"]
    assert packed["quantization"]["packed_max_abs_diff"] == 0.0
    # 5% of the hidden INT8 weights plus their bits; biases, scales and the dense classifier stay as they are
    assert packed["onnx_bytes"] <= 0.4 * plain["onnx_bytes"], (packed["onnx_bytes"], plain["onnx_bytes"])

    def optimized_ops(path):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{path.stem}-optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)

    # no dead units, so the unpacked file is the same INT8 graph: once ONNX Runtime folds the packed weights,
    # both run the same (fused INT8) kernels
    assert packed["removed_units"] == {}
    assert optimized_ops(tmp_path / "True.onnx") == optimized_ops(tmp_path / "False.onnx")

    from serving.server import load_model
    from serving.settings import Settings

    served = load_model(Settings(model_uri=str(tmp_path / "True.onnx")))  # the service takes the file as it is
    assert (served.card.quantization, served.card.onnx_format) == (mode, "compact")
    assert served.card.file_bytes == packed["onnx_bytes"]
    x = tiny_data.test.x[:32].numpy()
    unpacked = ort.InferenceSession(str(tmp_path / "False.onnx"), providers=["CPUExecutionProvider"])
    assert (served.logits(x) == unpacked.run(None, {"input": x})[0]).all()


@pytest.mark.parametrize("mode, kernel", [("dynamic", "DynamicQuantizeMatMul"), ("static", "QGemm")])
def test_a_structured_int8_file_is_at_most_0_3x_its_float_file_and_runs_int8_kernels(trained, tiny_data, tmp_path,
                                                                                      mode, kernel):
    import collections
    import copy

    import onnx
    import onnxruntime as ort

    structured = copy.deepcopy(trained)
    *hidden, _ = [m for m in structured.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():  # every other unit of each hidden layer dead: the compact export removes it
        for layer in hidden:
            layer.weight[1::2] = 0
            layer.bias[1::2] = 0
    args = (structured, tiny_data.input_shape)
    float_report = export_checked(*args, tmp_path / "float.onnx", CARD, tiny_data.test.x[:64], 1e-4)
    int8_report = export_checked(*args, tmp_path / "int8.onnx", CARD, tiny_data.test.x[:64], 1e-4,
                                 quantization=_gate(tiny_data, mode, 1.0, 1.0))
    assert float_report["removed_units"] == int8_report["removed_units"] == {"1.1": 150, "1.3": 50}
    quant = int8_report["quantization"]
    assert quant["packed_max_abs_diff"] == 0.0, "the minified INT8 file computes what the quantizer's file does"
    # both files minified alike; INT8 weights are 1/4 of the float ones, and static QOperator adds per-channel scales,
    # INT32 biases and one scale / zero point per activation (the structured models of docs/deploy.md: 0.28-0.29x)
    assert int8_report["onnx_bytes"] <= 0.3 * float_report["onnx_bytes"], (int8_report["onnx_bytes"],
                                                                           float_report["onnx_bytes"])
    assert quant["float_onnx_bytes"] == float_report["onnx_bytes"] == (tmp_path / "float.onnx").stat().st_size
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "int8.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops[kernel] == len(hidden) + 1 and not {"Gemm", "MatMul"} & set(ops), ops


def test_a_model_that_quantization_breaks_is_refused_and_nothing_is_written(trained, tiny_data, tmp_path):
    import copy

    broken = copy.deepcopy(trained)
    with torch.no_grad():  # one outlier per layer: per-tensor INT8 steps then round every other weight to 0
        for layer in (m for m in broken.modules() if isinstance(m, torch.nn.Linear)):
            layer.weight[0, 0] = 1000 * layer.weight.abs().max()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the previous export")
    with pytest.raises(QuantizationError, match=r"accuracy drop 0\.\d+ \(limit export\.max_quant_acc_drop 0\.01\), "
                                                 r"CWV rise -?\d\.\d+ \(limit export\.max_quant_cwv_rise 0\.005\)"):
        export_checked(broken, tiny_data.input_shape, path, CARD, tiny_data.test.x[:64], 1e-4,
                       quantization=_gate(tiny_data, acc_drop=0.01, cwv_rise=0.005))
    assert path.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"], "no temp file is left behind"


def test_static_quantization_without_calibration_inputs_is_refused(tiny_data):
    with pytest.raises(QuantizationError, match="static quantization needs calibration inputs"):
        QuantizationGate("static", 0.01, 0.005, tiny_data.test.x.numpy(), tiny_data.test.y.numpy(), 10, None)
    with pytest.raises(QuantizationError, match=r"quantization mode 'int4': choose from \['dynamic', 'static'\]"):
        QuantizationGate("int4", 0.01, 0.005, tiny_data.test.x.numpy(), tiny_data.test.y.numpy(), 10, None)


@pytest.mark.parametrize("override, message", [
    ("export.quantize=int4", r"export.quantize: must be one of \['none', 'dynamic', 'static'\], got 'int4'"),
    ("export.max_quant_cwv_rise=-0.1", "export.max_quant_cwv_rise: must be >= 0"),
    ("export.calibration_samples=0", "export.calibration_samples: must be positive"),
])
def test_bad_quantization_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        experiment_from_params(apply_overrides({}, [override]))


def test_the_gate_follows_the_export_config(tiny_data):
    from ballot.quantize import gate_for

    assert gate_for(tiny_config().export, tiny_data) is None, "export.quantize defaults to none"
    cfg = tiny_config("export.quantize=static", "export.calibration_samples=100", "export.max_quant_acc_drop=0.02")
    gate = gate_for(cfg.export, tiny_data)
    assert gate.mode == "static" and gate.max_acc_drop == 0.02 and gate.max_cwv_rise == 0.005
    assert len(gate.calibration) == 100 and len(gate.y) == len(tiny_data.test) and gate.num_classes == 10
    train = tiny_data.train.x.flatten(1).numpy()
    rows = [int(np.flatnonzero((train == x.reshape(-1)).all(1))[0]) for x in gate.calibration]
    assert len(set(rows)) == 100, "distinct training inputs"
    assert np.bincount(tiny_data.train.y[rows].numpy(), minlength=10).tolist() == [10] * 10, "10 of every class"
    assert (gate_for(cfg.export, tiny_data).calibration == gate.calibration).all(), "the same rows again"
    assert not (gate_for(cfg.export, tiny_data, seed=1).calibration == gate.calibration).all(), "seeded"


def test_a_class_sorted_training_set_calibrates_on_every_class():
    from ballot.data import DataBundle, Split
    from ballot.quantize import calibration_index, gate_for

    y = torch.arange(4).repeat_interleave(400)  # 4 classes x 400 rows, in class order
    x = torch.rand(len(y), 3)
    x[:, 0] = y  # each row names its class
    split = Split(x, y)
    data = DataBundle(split, split, split, ["a", "b", "c", "d"], torch.arange(len(y)), torch.arange(0))
    gate = gate_for(tiny_config("export.quantize=static", "export.calibration_samples=512").export, data)
    assert np.bincount(gate.calibration[:, 0].astype(int), minlength=4).tolist() == [128] * 4
    # a class with fewer rows than its share gives all of them; the others share what it leaves (rounded: 512 in all)
    small = torch.cat([torch.zeros(5, dtype=torch.long), torch.arange(1, 4).repeat_interleave(400)])
    assert torch.bincount(small[calibration_index(small, 512, 4)]).tolist() == [5, 169, 169, 169]
    assert torch.bincount(small[calibration_index(small, 10, 4)]).tolist() == [2, 2, 3, 3]
    assert calibration_index(small, 5000, 4).tolist() == list(range(len(small))), "every row when asked for more"
