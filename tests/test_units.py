"""Structured (unit) pruning: DepGraph's coupled groups, exactly dead units, the density rule, both unit pruners."""

import pytest
import torch

from ballot.errors import ConfigError
from ballot.experiment import run_prune
from ballot.masks import Mask
from ballot.models import build_model
from ballot.pruning.units import kept_units, select_units, unit_counts, unit_groups, unit_mask, unit_scores
from tests.conftest import tiny_config

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 12, 12), "resnet20": (3, 16, 16)}


def _half_mask(name: str):
    torch.manual_seed(0)
    model = build_model(name, SHAPES[name], 10).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics and shifts
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2), module.bias.data.uniform_(-1, 1)
    groups = unit_groups(model, SHAPES[name])
    keep = select_units(unit_scores(model, groups), {g.name: g.size // 2 for g in groups})
    return model, groups, keep, unit_mask(model, groups, keep)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_removed_units_are_exactly_dead_physical_removal_keeps_the_outputs(name):
    import torch_pruning as tp

    model, groups, keep, mask = _half_mask(name)
    mask.apply(model)
    x = torch.randn(5, *SHAPES[name])
    with torch.no_grad():
        expected = model(x)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:2])
    modules = dict(model.named_modules())
    for group in groups:
        root = modules[group.name.rsplit(".", 1)[0]]
        handler = tp.prune_linear_out_channels if isinstance(root, torch.nn.Linear) else tp.prune_conv_out_channels
        graph.get_pruning_group(root, handler, idxs=torch.nonzero(~keep[group.name]).flatten().tolist()).prune()
    with torch.no_grad():
        got = model(x)
    assert sum(p.numel() for p in model.parameters()) < sum(t.numel() for t in mask.values())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _separable(groups: int, middle: int = 16, classes: int = 3) -> torch.nn.Module:
    """conv -> BN -> grouped (or, with groups 16, depthwise) conv to ``middle`` channels -> BN -> pointwise conv ->
    pool -> classifier."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, middle, 3, padding=1, groups=groups), nn.BatchNorm2d(middle), nn.ReLU(),
                         nn.Conv2d(middle, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, classes)).eval()


def test_depthwise_units_are_exactly_dead_and_physically_removable():
    import torch_pruning as tp

    torch.manual_seed(0)
    model, shape = _separable(16), (1, 8, 8)
    groups = unit_groups(model, shape)
    keep = select_units(unit_scores(model, groups), {g.name: g.size // 2 for g in groups})
    unit_mask(model, groups, keep).apply(model)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = model(x)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:2])
    modules = dict(model.named_modules())
    for group in groups:
        removed = torch.nonzero(~keep[group.name]).flatten().tolist()
        root = modules[group.name.rsplit(".", 1)[0]]
        graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=removed).prune()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("groups, middle", [(4, 16), (16, 32), (8, 16)])
def test_grouped_convolutions_other_than_depthwise_are_refused_by_name(groups, middle):
    from ballot.errors import MaskError

    # a unit's input channel is a column of one group's rows only; a channel multiplier (16 -> 32 in 16 groups)
    # crashed the mask after dense training
    with pytest.raises(MaskError, match=rf"grouped convolution '3' \(groups={groups}, 16 -> {middle} channels\)"):
        unit_groups(_separable(groups, middle), (1, 8, 8))


def test_attention_layers_are_refused_by_name():
    from ballot.errors import MaskError

    nn = torch.nn
    attention = nn.Sequential(nn.Flatten(1, 2), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                              nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(MaskError, match=r"through the attention layer '1.self_attn'; use prune.granularity=weight"):
        unit_groups(attention, (1, 8, 8))


def test_a_model_unit_granularity_cannot_prune_is_refused_before_any_training(monkeypatch):
    from ballot import models
    from ballot.errors import MaskError
    from ballot.experiment import prepare_data

    monkeypatch.setitem(models.MODELS, "grouped", lambda shape, classes: _separable(4, classes=classes))
    with pytest.raises(MaskError, match="grouped convolution"):
        prepare_data(tiny_config("base.model=grouped", "prune.granularity=unit", "prune.method=magnitude"))
    assert prepare_data(tiny_config("base.model=grouped")).num_classes == 10, "weight granularity prunes it"


class _HeadFirst(torch.nn.Module):
    """A classifier defined before the layers that feed it: module order and call order differ."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(16, 3)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                        torch.nn.Linear(32, 16), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_the_classifier_is_the_layer_called_last_and_keeps_every_class_output():
    from ballot.compact import remove_dead_units
    from ballot.masks import classifier_layer

    torch.manual_seed(0)
    model, shape = _HeadFirst(), (1, 8, 8)
    assert classifier_layer(model, shape) is model.head and model.training, "the mode is restored"
    separable = _separable(16).train()
    separable[1].eval()  # a BatchNorm kept in eval inside a training model stays so
    assert classifier_layer(separable, shape) is separable[-1]
    assert separable.training and separable[4].training and not separable[1].training
    groups = unit_groups(model, shape)
    assert {s.param for g in groups for s in g.slices if s.dim == 0} == {"body.1.weight", "body.1.bias",
                                                                        "body.3.weight", "body.3.bias"}
    keep = select_units(unit_scores(model, groups), {g.name: 1 for g in groups})
    unit_mask(model, groups, keep).apply(model)
    x = torch.randn(4, *shape)
    compact, removed = remove_dead_units(model.eval(), shape, channel_multiple=1)
    assert removed == {"body.1": 31, "body.3": 15} and compact.head.out_features == 3
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=0, atol=1e-6)


def test_resnet_residual_stream_is_one_group_and_its_normalisations_are_pinned():
    model = build_model("resnet20", SHAPES["resnet20"], 10)
    groups = {g.name: g for g in unit_groups(model, SHAPES["resnet20"])}
    stem = groups["1.0.weight"]  # the stem conv feeds the first stage's residual stream
    rows = {s.param for s in stem.slices if s.dim == 0}
    assert {"1.3.conv2.weight", "1.4.conv2.weight", "1.5.conv2.weight", "1.1.weight", "1.3.bn2.bias"} <= rows
    _, _, keep, mask = _half_mask("resnet20")
    assert "1.3.bn2.weight" in mask.pinned and "1.3.bn2.weight" not in mask
    dropped = ~keep["1.0.weight"]
    assert not mask.pinned["1.3.bn2.bias"][dropped].any() and mask.pinned["1.3.bn2.bias"][~dropped].all()


def test_pinned_entries_round_trip_stay_out_of_the_density_and_stay_zero_in_training(tmp_path, tiny_data):
    model, groups, keep, mask = _half_mask("mlp")
    assert set(mask.pinned) == {"1.1.bias", "1.3.bias"}
    weights_only = Mask(dict(mask.items()))
    assert mask.density() == weights_only.density() and mask.kept == weights_only.kept
    mask.save(tmp_path / "m.safetensors")
    loaded = Mask.load(tmp_path / "m.safetensors")
    assert loaded.to_bytes() == mask.to_bytes() and set(loaded.pinned) == set(mask.pinned)

    from ballot.train import train

    cfg = tiny_config().prune.retrain
    data_model = build_model("mlp", tiny_data.input_shape, tiny_data.num_classes)
    groups = unit_groups(data_model, tiny_data.input_shape)
    mask = unit_mask(data_model, groups, select_units(unit_scores(data_model, groups), {g.name: 5 for g in groups}))
    train(data_model, tiny_data.train, cfg, mask=mask, progress=False)
    params = dict(data_model.named_parameters())
    for name, keep_entries in mask.entries().items():
        assert torch.count_nonzero(params[name][~keep_entries]) == 0, name
    assert kept_units(mask, groups) == {g.name: 5 for g in groups}


def test_one_keep_ratio_for_every_group_and_the_density_as_close_as_units_allow():
    model = build_model("cnn", SHAPES["cnn"], 10)
    groups = unit_groups(model, SHAPES["cnn"])
    counts = unit_counts(model, groups, 0.25)
    assert counts == {g.name: g.size // 2 for g in groups}  # 32/64-channel layers: half the units give ~0.25
    tiny = unit_counts(model, groups, 1e-4)
    assert all(k == 1 for k in tiny.values())  # never an empty layer


@pytest.mark.parametrize("method", ["magnitude", "ballot"])
def test_unit_pruners_remove_whole_units_deterministically(method, tiny_data, tiny_dense):
    cfg = tiny_config(f"prune.method={method}", "prune.granularity=unit", "base.density=0.3")
    first, second = run_prune(cfg, tiny_data, tiny_dense), run_prune(cfg, tiny_data, tiny_dense)
    assert first.mask.to_bytes() == second.mask.to_bytes()
    groups = unit_groups(first.model, tiny_data.input_shape)
    assert kept_units(first.mask, groups) == unit_counts(first.model, groups, 0.3)
    params = dict(first.model.named_parameters())
    for name, keep in first.mask.entries().items():
        assert torch.count_nonzero(params[name][~keep]) == 0, name
    if method == "ballot":
        masks = first.round_masks
        assert all(b.is_subset_of(a) for a, b in zip(masks, masks[1:]))


@pytest.mark.parametrize("override, message", [
    (["prune.method=lth"], "'unit' is available for"),
    (["prune.method=ballot", "prune.ballot.conflict=protect"], "set prune.ballot.conflict none"),
    (["prune.granularity=block"], "unknown 'block'"),
])
def test_unsupported_unit_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("prune.granularity=unit", *override)


def test_a_unit_pruned_run_exports_as_a_smaller_dense_network_with_the_same_outputs(tmp_path, tiny_data, tiny_dense):
    from ballot.export import export_run, read_metadata
    from ballot.experiment import model_metrics

    cfg = tiny_config("prune.method=magnitude", "prune.granularity=unit", "base.density=0.3")
    result = run_prune(cfg, tiny_data, tiny_dense)
    metrics = {**model_metrics(result.model, tiny_data, "cpu"), "density": result.mask.density()}
    report = export_run(result.model, result.mask, tiny_data, cfg, metrics, tmp_path / "model.onnx")
    groups = unit_groups(result.model, tiny_data.input_shape)
    kept = kept_units(result.mask, groups)
    assert sum(report["removed_units"].values()) == sum(g.size - kept[g.name] for g in groups)
    assert report["parity"]["max_abs_diff"] <= cfg.export.parity_tolerance
    assert report["onnx_parameters"] < sum(p.numel() for p in result.model.parameters())
    assert read_metadata(tmp_path / "model.onnx")["granularity"] == "unit"


def _shufflenet(shape, num_classes):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=num_classes)  # Torch-Pruning divides by zero on it
    model.conv1[0] = torch.nn.Conv2d(shape[0], 24, 3, 2, 1, bias=False)
    return model


def test_a_model_torch_pruning_cannot_trace_is_refused_for_units_before_any_training(monkeypatch):
    from ballot import models
    from ballot.errors import UntraceableModelError
    from ballot.experiment import prepare_data

    with pytest.raises(UntraceableModelError, match=r"^Torch-Pruning cannot trace the model's unit dependencies "
                                                     r"\(ZeroDivisionError: .*\), which unit pruning needs; "
                                                     r"prune.granularity=weight does not$"):
        unit_groups(_shufflenet((3, 16, 16), 10), (3, 16, 16))
    monkeypatch.setitem(models.MODELS, "shuffled", _shufflenet)
    with pytest.raises(UntraceableModelError, match="ZeroDivisionError"):
        prepare_data(tiny_config("base.model=shuffled", "prune.granularity=unit", "prune.method=magnitude"))
    assert prepare_data(tiny_config("base.model=shuffled")).num_classes == 10, "weight granularity prunes it"


@pytest.mark.slow
def test_an_untraceable_model_exports_packed_with_its_dead_units_kept_and_says_so(tmp_path):
    from ballot.export import bake, describe, export_checked
    from ballot.masks import magnitude_scores

    shape = (3, 16, 16)
    model = _shufflenet(shape, 10).eval()
    baked = bake(model, Mask.top_k(magnitude_scores(model), 0.05))
    report = export_checked(baked, shape, tmp_path / "m.onnx", {}, torch.rand(16, *shape), 1e-4)
    assert report["removed_units"] == {} and "ZeroDivisionError" in report["dead_units_kept"]
    assert report["onnx_bytes"] < report["dense_onnx_bytes"] / 4, "the weights are packed all the same"
    assert describe(report)[0].startswith("export: dead units not removed (the weights are still packed): ")
