"""The export's refusals: a file that is not a `ballot export` ONNX file, and a model ONNX Runtime disagrees with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ballot.errors import ParityError, StorageError
from ballot.export import bake, export_checked, export_onnx, read_metadata

SHAPE = (1, 2, 3)


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return bake(nn.Sequential(nn.Flatten(), nn.Linear(6, 3)), None)


def test_read_metadata_refuses_a_file_without_a_graph(tmp_path):
    import onnx
    from onnx import helper

    good = export_onnx(_linear(), SHAPE, tmp_path / "good.onnx", {"acc": 0.5})
    assert read_metadata(good) == {"acc": 0.5}
    (tmp_path / "empty.onnx").write_bytes(b"")  # parses as an empty ModelProto
    no_opset = helper.make_model(onnx.load(str(good)).graph, opset_imports=[])
    (tmp_path / "no-opset.onnx").write_bytes(no_opset.SerializeToString())
    no_nodes = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 20)])
    helper.set_model_props(no_nodes, {"acc": "0.5"})
    (tmp_path / "no-nodes.onnx").write_bytes(no_nodes.SerializeToString())
    for name in ("empty.onnx", "no-opset.onnx", "no-nodes.onnx"):
        path = tmp_path / name
        with pytest.raises(StorageError, match=rf"^'{path}' is not an ONNX file written by `ballot export`: it has "
                                               r"no graph nodes or no opset import$"):
            read_metadata(path)


@pytest.mark.parametrize("compact", [True, False])
def test_a_parity_failure_leaves_the_previous_file_and_no_temp_file(tmp_path, monkeypatch, compact):
    import onnxruntime as ort

    run = ort.InferenceSession.run

    def off_by_one(self, *args, **kwargs):  # ONNX Runtime's logits, each 1 away from PyTorch's
        return [output + 1 for output in run(self, *args, **kwargs)]

    path = tmp_path / "model.onnx"
    path.write_bytes(b"the previous export")
    inputs = torch.rand(8, *SHAPE)
    export_checked(_linear(), SHAPE, tmp_path / "unpatched.onnx", {}, inputs, 1e-4, compact=compact)
    monkeypatch.setattr(ort.InferenceSession, "run", off_by_one)
    with pytest.raises(ParityError, match=r"^ONNX Runtime differs from PyTorch by 1 on 8 test inputs, 0\.\d+ x "
                                          r"\(1 \+ \|logit\|\) \(export.parity_tolerance 0.0001\)$"):
        export_checked(_linear(), SHAPE, path, {}, inputs, 1e-4, compact=compact)
    assert path.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "unpatched.onnx"], "no temp file is left"


@pytest.mark.parametrize("scale, passes", [(0.01, False), (100.0, True)])
def test_parity_allows_float_rounding_in_proportion_to_the_logits(tmp_path, monkeypatch, scale, passes):
    """ONNX Runtime's logits off by 1e-3: beyond the tolerance where the logits are about 0.1 (1e-3 / 1.1), within
    it where they are at least 500 (1e-3 / 501 = 2e-6), as float32 rounding grows with the logits."""
    import onnxruntime as ort

    run = ort.InferenceSession.run

    def off(self, *args, **kwargs):
        return [output + 1e-3 for output in run(self, *args, **kwargs)]

    model = _linear()
    with torch.no_grad():  # logits scale x (10 + w.x), |w.x| < 5 on inputs in [1, 2]
        model[-1].weight.mul_(scale)
        model[-1].bias.fill_(10 * scale)
    monkeypatch.setattr(ort.InferenceSession, "run", off)
    inputs = 1 + torch.rand(8, *SHAPE)
    if passes:
        report = export_checked(model, SHAPE, tmp_path / "m.onnx", {}, inputs, 1e-4, compact=False)
        assert report["parity"]["max_abs_diff"] > 1e-4 and report["parity"]["max_scaled_diff"] < 1e-5
    else:
        with pytest.raises(ParityError, match=r"by 0.001 on 8 test inputs, 0.000[89]\d* x"):
            export_checked(model, SHAPE, tmp_path / "m.onnx", {}, inputs, 1e-4, compact=False)


def test_exporting_a_recurrent_model_prints_none_of_pytorchs_internal_warnings(recwarn):
    from ballot.export import onnx_proto
    from ballot.models import build_model

    onnx_proto(build_model("lstm", (12, 6), 3).eval(), (12, 6))
    assert [str(w.message)[:60] for w in recwarn] == []
