"""Models a user adds to the registry: recurrent layers are pruned like any weight matrix, tied weights once,
parameters no method prunes are announced, and a forward pass that fixes the batch size is refused at export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ballot import models
from ballot.cli import main
from ballot.errors import MaskError, ModelError
from ballot.experiment import coverage_notice
from ballot.export import onnx_proto
from ballot.masks import Mask, budget, prunable_names, unpruned_parameters
from ballot.models import MODELS, build_model
from ballot.pruning.fairscratch import bias_name, freeze_as_scratch
from ballot.pruning.units import check_unit_prunable
from ballot.storage import load_state, load_tensors, save_state
from tests.conftest import TINY

TINY_FLAGS = [flag for item in TINY if not item.startswith("base.") for flag in ("--set", item)]


class _Rows(nn.Module):
    """An image read row by row: a recurrent layer over the rows, a linear head on its last output."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, cell: type[nn.RNNBase] = nn.GRU) -> None:
        super().__init__()
        self.recurrent = cell(shape[0] * shape[2], 32, batch_first=True)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.permute(0, 2, 1, 3).flatten(2)  # (batch, height, channels x width)
        return self.head(self.recurrent(rows)[0][:, -1])


def test_recurrent_weight_matrices_are_prunable_and_their_biases_are_not():
    lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=4)
    assert prunable_names(nn.Sequential(lstm)) == [
        f"0.weight_{kind}_l{layer}{direction}" for layer in (0, 1) for direction in ("", "_reverse")
        for kind in ("ih", "hh", "hr")]
    assert prunable_names(nn.Sequential(nn.LSTMCell(4, 8), nn.GRUCell(8, 8))) == [
        "0.weight_ih", "0.weight_hh", "1.weight_ih", "1.weight_hh"]
    model = _Rows((1, 8, 8), 3)
    assert prunable_names(model) == ["recurrent.weight_ih_l0", "recurrent.weight_hh_l0", "head.weight"]
    biases = 2 * 3 * 32 + 3
    assert sum(unpruned_parameters(model).values()) == biases


def test_a_model_mostly_outside_the_prunable_layers_gets_a_note_naming_the_largest_parameters():
    class Embedded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(1000, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.table(x.long()).mean(1))

    notice = coverage_notice(Embedded())
    assert notice is not None
    assert "16,003 of the model's 16,051 parameters (99.7%)" in notice and "the other 48." in notice
    assert "Largest: table.weight (16,000), head.bias (3)" in notice
    for name in MODELS:
        assert coverage_notice(build_model(name, (3, 16, 16), 10)) is None, name
    assert coverage_notice(_Rows((1, 8, 8), 3)) is None


def test_unit_granularity_refuses_recurrent_layers_by_name():
    with pytest.raises(MaskError, match=r"through the recurrent layer 'recurrent' \(LSTM\); use prune.granularity"):
        check_unit_prunable(_Rows((1, 8, 8), 3, nn.LSTM))


@pytest.mark.parametrize("weight, bias", [
    ("weight", "bias"), ("1.weight", "1.bias"), ("a.self_attn.in_proj_weight", "a.self_attn.in_proj_bias"),
    ("a.q_proj_weight", "a.in_proj_bias"), ("a.v_proj_weight", "a.in_proj_bias"),
    ("rnn.weight_hh_l1_reverse", "rnn.bias_hh_l1_reverse"), ("cell.weight_ih", "cell.bias_ih"),
    ("rnn.weight_hr_l0", "rnn.bias_hr_l0")])  # a projection has no bias: the name is looked up and not found
def test_the_bias_of_each_kind_of_prunable_weight(weight, bias):
    assert bias_name(weight) == bias


def test_fairscratch_zeroes_the_biases_of_recurrent_and_separate_projection_layers():
    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.LSTM(6, 8), "attend": nn.MultiheadAttention(8, 2, kdim=4, vdim=4)})
    assert model["attend"].in_proj_weight is None, "separate q, k, v projections share in_proj_bias"
    nn.init.uniform_(model["attend"].in_proj_bias)
    freeze_as_scratch(model)
    params = dict(model.named_parameters())
    for name in ("rnn.bias_ih_l0", "rnn.bias_hh_l0", "attend.in_proj_bias"):
        assert not params[name].any(), name
    assert torch.equal(params["rnn.weight_hh_l0"].abs().unique(), torch.tensor([(2.0 / 8) ** 0.5]))


def test_a_forward_pass_that_fixes_the_batch_size_is_refused_at_export():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x.reshape(len(x), 16))

    with pytest.raises(ModelError, match=r"fixes the batch size.*batches of 2 only: take the batch size as x.shape"):
        onnx_proto(Fixed(), (4, 4))


def test_ballot_prunes_a_recurrent_model_to_the_exact_budget_and_exports_it_with_parity(tmp_path, monkeypatch,
                                                                                       capsys):
    monkeypatch.setitem(models.MODELS, "rows", _Rows)
    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--model", "rows", "--method", "ballot", "--density", "0.1",
                 "--seed", "0", "--out", str(out), *TINY_FLAGS]) == 0
    mask = Mask.load(out / "mask.safetensors")
    assert set(mask) == {"1.recurrent.weight_ih_l0", "1.recurrent.weight_hh_l0", "1.head.weight"}
    assert mask.kept == budget(mask.total, 0.1)
    assert all(0 < layer.kept < layer.total for layer in mask.report()), "every matrix is pruned, none emptied"
    weights = load_tensors(out / "model.safetensors")
    for name in mask:
        assert not weights[name][~mask[name]].any(), f"{name}: pruned weights are exactly zero"
    assert main(["export", "--dir", str(out), "--out", str(tmp_path / "rows.onnx")]) == 0
    assert "export: parity max |diff|" in capsys.readouterr().err


class _Tied(nn.Module):
    """Two layers sharing one weight matrix."""

    def __init__(self, shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(int(torch.tensor(shape).prod()), 16)
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 16)
        self.second.weight = self.first.weight
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.embed(x.flatten(1)))
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))))


def test_a_tied_weight_is_one_prunable_weight_and_its_state_round_trips(tmp_path):
    model = _Tied((1, 8, 8), 3)
    assert prunable_names(model) == ["embed.weight", "first.weight", "head.weight"]
    save_state(model, tmp_path / "tied.safetensors")  # safetensors refuses tensors that share memory
    loaded = load_state(_Tied((1, 8, 8), 3), tmp_path / "tied.safetensors")
    torch.testing.assert_close(loaded.first.weight, model.first.weight, rtol=0, atol=0)


def test_a_weight_tied_to_a_parameter_outside_the_prunable_layers_is_pruned_under_its_first_name():
    class TiedHead(nn.Module):  # a language model's tie: the output layer reuses the embedding table
        def __init__(self) -> None:
            super().__init__()
            self.table, self.body, self.head = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 50)
            self.head.weight = self.table.weight

    assert prunable_names(TiedHead()) == ["body.weight", "table.weight"]
    root = nn.Module()
    root.shared, root.layer = nn.Parameter(torch.rand(3, 4)), nn.Linear(4, 3)
    root.layer.weight = root.shared
    assert prunable_names(root) == ["shared"]


def test_a_computed_weight_is_refused_by_layer_name():
    model = nn.Sequential(nn.Flatten(), nn.utils.parametrizations.weight_norm(nn.Linear(64, 3)))
    with pytest.raises(MaskError, match=r"^layer '1' computes its weight \(a parametrization such as weight_norm\)"):
        prunable_names(model)


def test_a_computed_weight_is_refused_before_any_training(monkeypatch):
    from ballot.experiment import prepare_data
    from tests.conftest import tiny_config

    monkeypatch.setitem(models.MODELS, "normed", lambda shape, classes: nn.Sequential(
        nn.Flatten(), nn.utils.parametrizations.weight_norm(nn.Linear(64, classes))))
    with pytest.raises(MaskError, match="computes its weight"):
        prepare_data(tiny_config("base.model=normed"))


class _TwoHeads(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(64, 32), nn.Linear(32, num_classes), nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.body(x.flatten(1)))
        return self.head(hidden), self.aux(hidden)


class _AuxWhileTraining(_TwoHeads):
    """torchvision's GoogLeNet and Inception v3 pattern: auxiliary outputs in training mode only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits, aux = super().forward(x)
        return (logits, aux) if self.training else logits


def _frozen_stem(shape: tuple[int, ...], classes: int) -> nn.Module:
    stem = nn.Linear(64, 32).requires_grad_(False)
    return nn.Sequential(nn.Flatten(), stem, nn.ReLU(), nn.Linear(32, classes))


@pytest.mark.parametrize("builder, message", [
    (lambda shape, classes: _TwoHeads(classes),
     r"^model 'user' returns a tuple in training mode; its forward must return one tensor of logits, shape "
     r"\(batch, 10\)$"),
    (lambda shape, classes: _AuxWhileTraining(classes), r"^model 'user' returns a tuple in training mode"),
    (lambda shape, classes: nn.Sequential(nn.Flatten(), nn.Linear(64, classes), nn.Softmax(dim=1)),
     r"^model 'user' returns probabilities \(non-negative rows that sum to 1\); return the logits before the softmax"),
    (lambda shape, classes: nn.Sequential(nn.Flatten(), nn.Linear(64, 1)),
     r"^model 'user' returns shape \(2, 1\) for a batch of 2; it must return logits of shape \(batch, 10\)"),
    (_frozen_stem, r"^model 'user' freezes prunable weight\(s\) \['1.1.weight'\] \(requires_grad False\)"),
])
def test_a_model_that_does_not_return_logits_or_freezes_a_weight_is_refused_before_any_training(
        builder, message, monkeypatch):
    """Each of these used to fail mid-run with a traceback (a tuple or a frozen weight) or train badly in silence
    (cross-entropy on probabilities)."""
    from ballot.experiment import prepare_data
    from tests.conftest import tiny_config

    monkeypatch.setitem(models.MODELS, "user", builder)
    with pytest.raises(ModelError, match=message):
        prepare_data(tiny_config("base.model=user"))


def test_log_probabilities_are_logits_enough_and_the_check_keeps_the_mode():
    """A final LogSoftmax is fine: cross-entropy applies log-softmax again, which leaves log-probabilities unchanged."""
    model = nn.Sequential(build_model("mlp", (1, 8, 8), 10), nn.LogSoftmax(dim=1)).double()
    models.check_logits("mlp", model, torch.rand(2, 1, 8, 8, dtype=torch.float64), 10)
    assert model.training
    models.check_logits("mlp", model.eval(), torch.rand(2, 1, 8, 8, dtype=torch.float64), 10)
    assert not model.training


def test_a_forward_that_fails_on_training_samples_is_named():
    with pytest.raises(ModelError, match=r"^model 'user' fails on two training samples in training mode: "
                                         r"RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        models.check_logits("user", nn.Sequential(nn.Flatten(), nn.Linear(63, 10)), torch.rand(2, 1, 8, 8), 10)


class _Shifted(nn.Module):
    """A linear classifier after a learned input shift of 2,560 parameters that no method prunes."""

    def __init__(self, shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.shift, self.head = nn.Parameter(torch.zeros(40, 64)), nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1) + self.shift.mean(0))


def test_the_note_on_unpruned_parameters_comes_before_the_dense_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(models.MODELS, "shifted", _Shifted)
    assert main(["prune", "--dataset", "digits", "--model", "shifted", "--method", "magnitude", "--out",
                 str(tmp_path / "run"), *TINY_FLAGS]) == 0
    err = capsys.readouterr().err
    note = err.index("note: 2,570 of the model's 3,210 parameters (80.1%) are outside the layers a method prunes")
    assert note < err.index("dense: ") and "Largest: 1.shift (2,560), 1.head.bias (10)" in err


def test_an_lstm_with_projections_is_refused_at_export_by_layer_name():
    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.recurrent, self.head = nn.LSTM(6, 8, proj_size=4, batch_first=True), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.recurrent(x)[0][:, -1])

    with pytest.raises(ModelError, match=r"^layer 'recurrent': PyTorch's ONNX exporter writes an LSTM with proj_size"):
        onnx_proto(Projected(), (5, 6))


def test_unit_granularity_refuses_tied_weights_by_name():
    with pytest.raises(MaskError, match=r"cannot prune 'second.weight', the same tensor as 'first.weight' \(tied\)"):
        check_unit_prunable(_Tied((1, 8, 8), 3))


def test_ballot_prunes_a_model_with_tied_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(models.MODELS, "tied", _Tied)
    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--model", "tied", "--method", "ballot", "--density", "0.1",
                 "--out", str(out), *TINY_FLAGS]) == 0
    mask = Mask.load(out / "mask.safetensors")
    assert set(mask) == {"1.embed.weight", "1.first.weight", "1.head.weight"}
    assert mask.kept == budget(mask.total, 0.1)
    weights = load_tensors(out / "model.safetensors")
    for name in ("1.first.weight", "1.second.weight"):
        assert not weights[name][~mask["1.first.weight"]].any(), name
