import copy
from dataclasses import replace

import pytest
import torch

from ballot.config import (FLOORED_SCHEDULES, BallotConfig, SafeCompressConfig, TrainConfig, apply_overrides,
                           experiment_from_params)
from ballot.data import Split
from ballot.masks import Mask, magnitude_scores
from ballot.models import build_model
from ballot.train import Batch, batch_bounds, floored, lr_factor, recalibrate_batchnorm, resolve_device, stretched, train


def _toy_split(n: int = 96) -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = (x.flatten(1).sum(1) > 8).long()
    return Split(x, y)


def test_pruned_weights_stay_exactly_zero_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 2)
    mask = Mask.top_k(magnitude_scores(model), 0.2)
    cfg = TrainConfig(min_steps=0, epochs=3, batch_size=16, lr=0.5, momentum=0.9, weight_decay=0.1, schedule="constant")
    train(model, _toy_split(), cfg, mask=mask, progress=False)
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        assert torch.count_nonzero(params[name][~keep]) == 0
        assert torch.count_nonzero(params[name][keep]) > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_is_deterministic_for_a_seed(optimizer):
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 4, 4), 2)
        train(model, _toy_split(), TrainConfig(min_steps=0, epochs=2, batch_size=16, optimizer=optimizer, lr=0.01), seed=3,
              progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_rewind_state_is_the_state_after_k_steps():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 2)
    reference = copy.deepcopy(model)
    data = _toy_split(64)  # 4 steps per epoch at batch 16
    result = train(model, data, TrainConfig(min_steps=0, epochs=3, batch_size=16, schedule="constant"), rewind_iter=4, seed=1,
                   progress=False)
    train(reference, data, TrainConfig(min_steps=0, epochs=1, batch_size=16, schedule="constant"), seed=1, progress=False)
    assert result.steps == 12
    for name, tensor in reference.state_dict().items():
        assert torch.equal(result.rewind_state[name], tensor)
    assert not torch.equal(result.rewind_state["1.1.weight"], model.state_dict()["1.1.weight"])


def test_training_learns_a_separable_problem():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 2)
    result = train(model, _toy_split(256), TrainConfig(min_steps=0, epochs=15, batch_size=32, lr=0.05), progress=False)
    first, last = result.history[0]["train_acc"], result.history[-1]["train_acc"]
    assert last > 0.9 and last > first + 0.1


def test_lr_schedules():
    cosine = TrainConfig(min_steps=0, epochs=10, lr=1.0, schedule="cosine", warmup_epochs=1)
    assert lr_factor(cosine, 0, 10) == pytest.approx(0.1)
    assert lr_factor(cosine, 9, 10) == pytest.approx(1.0)
    assert lr_factor(cosine, 10, 10) == pytest.approx(1.0)
    assert lr_factor(cosine, 100, 10) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(min_steps=0, epochs=10, schedule="step", step_epochs=3, gamma=0.5)
    assert [lr_factor(step, s, 10) for s in (0, 29, 30, 60)] == [1.0, 1.0, 0.5, 0.25]


def test_plateau_needs_a_metric_and_decays_without_improvement():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 2)
    cfg = TrainConfig(min_steps=0, epochs=5, batch_size=32, schedule="plateau", patience=0, gamma=0.5, lr=0.1)
    with pytest.raises(ValueError, match="plateau"):
        train(model, _toy_split(), cfg, progress=False)
    result = train(model, _toy_split(), cfg, epoch_metric=lambda m: 0.0, progress=False)
    assert [round(r["lr"], 4) for r in result.history] == [0.1, 0.1, 0.05, 0.025, 0.0125]


def test_class_weights_change_the_loss_landscape():
    runs = []
    for weights in (None, torch.tensor([1.0, 50.0])):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 4, 4), 2)
        train(model, _toy_split(), TrainConfig(min_steps=0, epochs=1, batch_size=16), class_weights=weights, progress=False)
        runs.append(model.state_dict()["1.5.weight"])
    assert not torch.equal(*runs)


def test_deferred_class_weights_train_on_plain_cross_entropy_until_their_start():
    cfg = TrainConfig(min_steps=0, epochs=2, batch_size=16, schedule="constant")  # 6 steps an epoch
    weights = torch.tensor([1.0, 50.0])
    runs = {}
    for name, w, start in (("plain", None, 0.0), ("weighted", weights, 0.0), ("deferred", weights, 0.5)):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 4, 4), 2)
        result = train(model, _toy_split(), cfg, class_weights=w, class_weights_from=start, rewind_iter=6,
                       progress=False)
        runs[name] = (result.rewind_state["1.5.weight"], model.state_dict()["1.5.weight"])
    assert torch.equal(runs["deferred"][0], runs["plain"][0])  # epoch 1: plain CE
    assert not torch.equal(runs["deferred"][0], runs["weighted"][0])
    assert not torch.equal(runs["deferred"][1], runs["plain"][1])  # epoch 2: weighted
    with pytest.raises(ValueError, match="fairness_start"):
        BallotConfig(fairness_start=1.0)  # 1 would never apply the weights
    with pytest.raises(ValueError, match="refine_start.*choose from"):
        BallotConfig(refine_start="theta_0")
    assert BallotConfig().refine_start == "best"  # the default: both starts, the better on validation


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_cuda_device_index_beyond_the_machine_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"'cuda:3' does not exist: this machine has 1 CUDA device"):
        resolve_device("cuda:3")


def test_empty_split_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        train(build_model("mlp", (1, 4, 4), 2), Split(torch.empty(0, 1, 4, 4), torch.empty(0, dtype=torch.long)),
              TrainConfig(), progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_keeps_pruned_weights_zero(precision):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 2)
    mask = Mask.top_k(magnitude_scores(model), 0.5)
    cfg = TrainConfig(min_steps=0, epochs=15, batch_size=32, lr=0.05, precision=precision)
    result = train(model, _toy_split(256), cfg, mask=mask, progress=False)
    assert result.history[-1]["train_acc"] > 0.85
    params = dict(model.named_parameters())
    assert all(torch.count_nonzero(params[n][~keep]) == 0 for n, keep in mask.items())
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast leaves the weights in fp32"


class _GradientRecorder:
    """A step hook keeping the gradient norms it sees after backward."""

    def __init__(self, model):
        self.params, self.norms = list(model.parameters()), []

    def before_backward(self, step, batch):
        pass

    def after_backward(self, step):
        self.norms.append(float(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in self.params))))

    def after_step(self, step):
        pass


def test_fp16_hooks_see_unscaled_gradients():
    runs = {}
    for precision in ("fp32", "fp16"):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 4, 4), 2)
        recorder = _GradientRecorder(model)
        train(model, _toy_split(64), TrainConfig(min_steps=0, epochs=1, batch_size=16, lr=1e-6, precision=precision),
              hook=recorder, progress=False)
        runs[precision] = recorder.norms
    # the scaler multiplies the loss by 2**16; unscaled, the fp16 gradients match fp32's to fp16 accuracy
    assert runs["fp16"] == pytest.approx(runs["fp32"], rel=0.02)


def test_an_extra_fp16_gradient_is_scaled_against_underflow_and_unscaled_after():
    """Ballot's second gradient (Batch.gradient) under fp16 autocast: per-sample gradients of order 1e-9 vanish in
    fp16 unless the loss is scaled, as the step's own backward is; scaled, they match fp32's."""
    torch.manual_seed(0)
    layer, x, y = torch.nn.Linear(8, 3), torch.randn(4, 8), torch.tensor([0, 1, 2, 0])

    def gradient(scaler, fp16):
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            per_sample = torch.nn.functional.cross_entropy(layer(x).float(), y, reduction="none")
        return Batch(per_sample, y, 10**9, scaler).gradient([layer.weight])[0]

    reference = gradient(None, fp16=False)
    assert torch.count_nonzero(gradient(None, fp16=True)) == 0  # what an unscaled extra backward gets
    scaled = gradient(torch.amp.GradScaler("cpu", init_scale=2.0**16), fp16=True)
    assert torch.allclose(scaled, reference, rtol=0, atol=0.01 * float(reference.abs().max()))


def test_an_unknown_precision_is_named():
    with pytest.raises(ValueError, match="precision: unknown 'fp8'"):
        TrainConfig(precision="fp8")


def test_batchnorm_recalibration_sets_the_exact_training_statistics_and_leaves_weights_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    bn = model[1]
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    x = torch.randn(270, 4) * 3 + 1  # 270 with batch 128: three batches of 90, so the mean of means is the mean
    model.eval()
    recalibrate_batchnorm(model, x, batch_size=128)
    with torch.no_grad():
        hidden = model[0](x)
    torch.testing.assert_close(bn.running_mean, hidden.mean(0), atol=1e-5, rtol=1e-5)
    batch_vars = torch.stack([hidden[i:i + 90].var(0) for i in range(0, 270, 90)])  # unbiased, as BatchNorm keeps
    torch.testing.assert_close(bn.running_var, batch_vars.mean(0), atol=1e-5, rtol=1e-5)
    assert bn.momentum == 0.1 and not model.training
    for name, value in weights.items():
        assert torch.equal(model.state_dict()[name], value), name


def test_batchnorm_recalibration_leaves_a_model_without_batchnorm_unchanged():
    model = build_model("mlp", (1, 8, 8), 10)
    before = copy.deepcopy(model.state_dict())
    recalibrate_batchnorm(model, torch.rand(50, 1, 8, 8), batch_size=16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_small_split_stretches_the_schedule_to_min_steps_and_keeps_its_shape():
    cfg = TrainConfig(epochs=4, batch_size=16, min_steps=50, schedule="step", warmup_epochs=0.5, step_epochs=2,
                      patience=1)
    long = stretched(cfg, 64)  # 4 steps an epoch: 4 epochs make 16 steps, 13 epochs the first >= 50
    assert (long.epochs, long.warmup_epochs, long.step_epochs, long.patience) == (13, 0.5 * 13 / 4, 6, 3)
    assert stretched(cfg, 256) is cfg, "16 steps an epoch: 64 steps already reach min_steps"
    assert stretched(replace(cfg, min_steps=0), 64).epochs == 4
    assert stretched(replace(cfg, epochs=0), 64).epochs == 0, "no training stays no training"


def test_training_runs_the_stretched_number_of_steps():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 2)
    result = train(model, _toy_split(64), TrainConfig(epochs=2, batch_size=16, min_steps=30), progress=False)
    assert (result.steps, len(result.history)) == (32, 8)


def test_sparse_training_configs_are_floored_in_epochs_only():
    cfg = SafeCompressConfig(epochs=3, batch_size=64, min_steps=100, lr_milestones=[0.5])
    assert floored(cfg, 640).epochs == 10 and floored(cfg, 640).lr_milestones == [0.5]
    assert floored(cfg, 6400) == cfg


def test_floored_schedules_names_every_group_with_a_floor():
    cfg = experiment_from_params(apply_overrides({}, [f"{group}.min_steps=7" for group in FLOORED_SCHEDULES]))
    groups = [cfg.train_dense, cfg.prune.retrain, cfg.prune.ballot.refine_train, cfg.prune.safecompress,
              cfg.prune.fairscratch]
    assert [group.min_steps for group in groups] == [7] * 5


def test_a_batchnorm_model_never_gets_a_one_sample_batch_and_keeps_its_step_count():
    assert batch_bounds(129, 128) == [(0, 128), (128, 129)], "without BatchNorm the batches stay as they are"
    assert batch_bounds(129, 128, avoid_single=True) == [(0, 65), (65, 129)]
    assert batch_bounds(257, 128, avoid_single=True) == [(0, 128), (128, 193), (193, 257)]
    assert batch_bounds(1, 128, avoid_single=True) == [(0, 1)], "one sample in all: nothing to split"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(129, 1, 8, 8, generator=g)
    split = Split(x, (x.flatten(1).sum(1) > 32).long())
    torch.manual_seed(0)
    vgg = build_model("vgg", (1, 8, 8), 2)  # 1x1 feature maps at the end: one sample cannot be normalised
    result = train(vgg, split, TrainConfig(epochs=1, batch_size=128, min_steps=0), progress=False)
    assert result.steps == 2
