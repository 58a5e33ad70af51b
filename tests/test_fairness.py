import math

import pytest
import torch

from ballot.fairness import (balanced_accuracy, class_metrics, evaluate, fairness_class_weights, gap_metrics,
                             group_metrics, predict, shrunk_class_accuracy)


def test_class_metrics_match_hand_computed_values():
    # class 0: 2/2 right, class 1: 1/2, class 2: 0/1  -> acc 3/5
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 0, 1]
    m = class_metrics(y_true, y_pred, 3)
    assert m["acc"] == pytest.approx(0.6)
    assert m["per_class"] == pytest.approx([1.0, 0.5, 0.0])
    assert m["cwv"] == pytest.approx(((1 - 0.6) ** 2 + (0.5 - 0.6) ** 2 + (0 - 0.6) ** 2) / 3)
    assert m["mcd"] == pytest.approx(1.0)
    assert m["worst_class"] == 0.0 and m["worst_class_index"] == 2


def test_absent_class_is_nan_and_left_out_of_gaps():
    # class 1 has no sample; the others: 1/2 and 1/1; overall 2/3
    m = class_metrics([0, 0, 2], [0, 1, 2], 3)
    assert m["per_class"][0] == pytest.approx(0.5)
    assert math.isnan(m["per_class"][1])
    assert m["per_class"][2] == 1.0
    assert m["cwv"] == pytest.approx(((0.5 - 2 / 3) ** 2 + (1 - 2 / 3) ** 2) / 2)
    assert m["mcd"] == pytest.approx(0.5)
    assert m["worst_class_index"] == 0


def test_perfect_predictions_are_perfectly_fair():
    m = class_metrics([0, 1, 2, 2], [0, 1, 2, 2], 3)
    assert (m["acc"], m["cwv"], m["mcd"]) == (1.0, 0.0, 0.0)


def test_bad_labels_and_lengths_raise():
    with pytest.raises(ValueError, match="labels must lie"):
        class_metrics([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="y_pred has"):
        class_metrics([0, 1], [0], 3)
    with pytest.raises(ValueError, match="y_pred has 1"):
        group_metrics([0, 1, 1], [1], group=[0, 0, 1])  # a length-1 prediction must not broadcast
    for labels in ([0.0, 1.7], [0.0, float("nan")]):
        with pytest.raises(ValueError, match="y_true must hold whole numbers"):
            class_metrics(labels, [0, 1], 3)
    assert class_metrics([0.0, 2.0], [0, 2], 3)["acc"] == 1.0, "whole-number floats are labels"


def test_group_metrics_by_sensitive_attribute():
    g = group_metrics([0, 0, 1, 1], [0, 1, 1, 1], group=[5, 5, 7, 7])
    assert g["per_group"] == {5: 0.5, 7: 1.0}
    assert g["group_gap"] == pytest.approx(0.5)
    assert g["group_var"] == pytest.approx(((0.5 - 0.75) ** 2 + (1 - 0.75) ** 2) / 2)


def test_balanced_accuracy_averages_the_classes_present():
    assert balanced_accuracy([1.0, math.nan, 0.5, 0.0]) == pytest.approx(0.5)
    assert math.isnan(balanced_accuracy([math.nan, math.nan]))


def test_gap_metrics_of_nothing_is_nan():
    gaps = gap_metrics([math.nan], 0.5)
    assert sorted(gaps) == ["cwv", "mcd", "worst"] and all(math.isnan(v) for v in gaps.values())


def test_fairness_class_weights_favour_weak_classes_with_mean_one():
    # balanced accuracy 0.5: the absent class sits there (weight 1 / 0.5)
    w = fairness_class_weights([1.0, 0.5, 0.0, math.nan], [4, 4, 4, 0], floor=0.1)
    raw = torch.tensor([1.0, 2.0, 10.0, 2.0])
    assert torch.allclose(w, raw / raw.mean())
    assert w.mean().item() == pytest.approx(1.0)


def test_shrunk_class_accuracy_by_hand():
    # b = (1 + 0 + 0.6) / 3; K = 10: class 0 (2 images) becomes (2 + 10 b) / 12, class 2 (100 images) (60 + 10 b) / 110
    shrunk = shrunk_class_accuracy([1.0, 0.0, 0.6], [2, 2, 100], prior_images=10)
    b = 1.6 / 3
    assert shrunk == pytest.approx([(2 + 10 * b) / 12, (10 * b) / 12, (60 + 10 * b) / 110])
    assert shrunk_class_accuracy([1.0, 0.0, 0.6], [2, 2, 100], prior_images=0) == pytest.approx([1.0, 0.0, 0.6])


def test_class_weights_from_two_images_a_class_stay_near_average():
    # 0/2 against 2/2 (b = 0.5): raw weights 1/0.2 and 1/1 differ 5x; with K = 10, 1/(5/12) and 1/(7/12) only 1.4x
    raw = fairness_class_weights([0.0, 1.0], [2, 2], floor=0.2)
    shrunk = fairness_class_weights([0.0, 1.0], [2, 2], floor=0.2, prior_images=10)
    assert (raw[0] / raw[1]).item() == pytest.approx(5.0)
    assert (shrunk[0] / shrunk[1]).item() == pytest.approx((7 / 12) / (5 / 12))
    # a well-measured class keeps nearly its own weight
    many = fairness_class_weights([0.0, 1.0], [10_000, 10_000], floor=0.2, prior_images=10)
    assert (many[0] / many[1]).item() == pytest.approx(5.0, rel=1e-2)


def test_class_weights_reject_mismatched_counts_and_empty_splits():
    with pytest.raises(ValueError, match="2 class accuracies but 3 class counts"):
        fairness_class_weights([0.5, 0.5], [1, 1, 1], floor=0.2)
    with pytest.raises(ValueError, match="no class has a sample"):
        fairness_class_weights([math.nan, math.nan], [0, 0], floor=0.2)


def test_evaluate_uses_argmax_of_the_model():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    m = evaluate(model, x, torch.tensor([0, 1, 1]), 2, group=torch.tensor([0, 0, 1]))
    assert m["per_class"] == [1.0, 0.5]
    assert m["per_group"] == {0: 1.0, 1: 0.0}


def test_evaluate_on_an_empty_split_gives_nan_not_a_crash():
    m = evaluate(torch.nn.Linear(2, 3), torch.empty(0, 2), torch.empty(0, dtype=torch.long), 3)
    assert math.isnan(m["acc"]) and math.isnan(m["cwv"]) and m["worst_class_index"] == -1


def test_fairness_objective_trades_accuracy_against_the_class_gap():
    from ballot.fairness import fairness_objective

    assert fairness_objective({"acc": 0.9, "mcd": 0.4}, 0.5) == pytest.approx(0.7)
    assert fairness_objective({"acc": 0.9, "mcd": 0.4}, 0.0) == pytest.approx(0.9)


def test_predict_moves_the_model_to_the_device_it_is_given():
    """A model loaded on the CPU and evaluated on a GPU (ballot evaluate, a reused dense state) must move with its
    inputs: predict puts it on ``device``."""
    class Recorder(torch.nn.Linear):
        def to(self, *args, **kwargs):
            self.moved_to = args
            return super().to(*args, **kwargs)

    model = Recorder(3, 2)
    logits = predict(model, torch.ones(5, 3), device="cpu")
    assert model.moved_to == ("cpu",) and logits.shape == (5, 2)
