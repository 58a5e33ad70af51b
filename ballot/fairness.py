"""Class-wise and group-wise fairness metrics (CWV, MCD, worst class, per group; README "Fairness metrics").

Absent classes: a class with no sample in the evaluation set has no accuracy. Its ``per_class``
entry is NaN (null in JSON) and it is left out of CWV, MCD and the worst class; CWV averages over the
classes that are present. The same rule applies to groups.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _labels(name: str, values: Any) -> torch.Tensor:
    """``values`` as a flat int64 tensor; ValueError naming ``name`` for a value that is not a whole number (a float
    label such as 1.7 or NaN would otherwise be truncated into some class)."""
    tensor = torch.as_tensor(values).detach().cpu().flatten()
    if tensor.is_floating_point() and not bool((torch.isfinite(tensor) & (tensor == tensor.round())).all()):
        raise ValueError(f"{name} must hold whole numbers (class or group indices), got non-integer values")
    return tensor.long()


def _paired(y_true: Any, y_pred: Any) -> tuple[torch.Tensor, torch.Tensor]:
    y_true, y_pred = _labels("y_true", y_true), _labels("y_pred", y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.numel()} labels but y_pred has {y_pred.numel()}")
    return y_true, y_pred


def per_class_accuracy(y_true: Any, y_pred: Any, num_classes: int) -> list[float]:
    """Recall of each class; NaN for a class with no sample."""
    y_true, y_pred = _paired(y_true, y_pred)
    if y_true.numel() and (int(y_true.min()) < 0 or int(y_true.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y_true.min())}, {int(y_true.max())}]")
    totals = torch.bincount(y_true, minlength=num_classes).double()
    hits = torch.bincount(y_true[y_true == y_pred], minlength=num_classes).double()
    return [float(h / t) if t > 0 else math.nan for h, t in zip(hits.tolist(), totals.tolist())]


def balanced_accuracy(per_class: list[float]) -> float:
    """The mean of the per-class accuracies over the classes present (NaN entries: no samples); NaN if none is."""
    present = [a for a in per_class if not math.isnan(a)]
    return sum(present) / len(present) if present else math.nan


def gap_metrics(per_group: list[float], overall: float) -> dict[str, float]:
    """CWV (variance around ``overall``), MCD (max - min) and the worst value, over non-NaN entries."""
    present = [a for a in per_group if not math.isnan(a)]
    if not present:
        return {"cwv": math.nan, "mcd": math.nan, "worst": math.nan}
    return {
        "cwv": sum((a - overall) ** 2 for a in present) / len(present),
        "mcd": max(present) - min(present),
        "worst": min(present),
    }


def class_metrics(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, Any]:
    """acc, per_class, cwv, mcd, worst_class (accuracy of the worst class) and worst_class_index."""
    y_true, y_pred = _paired(y_true, y_pred)
    per_class = per_class_accuracy(y_true, y_pred, num_classes)
    acc = float((y_true == y_pred).double().mean()) if y_true.numel() else math.nan
    gaps = gap_metrics(per_class, acc)
    present = [(a, c) for c, a in enumerate(per_class) if not math.isnan(a)]
    worst_index = min(present)[1] if present else -1
    return {"acc": acc, "per_class": per_class, "cwv": gaps["cwv"], "mcd": gaps["mcd"],
            "worst_class": gaps["worst"], "worst_class_index": worst_index}


def group_metrics(y_true: Any, y_pred: Any, group: Any) -> dict[str, Any]:
    """Accuracy per sensitive-attribute value, their variance around overall accuracy and max gap."""
    (y_true, y_pred), group = _paired(y_true, y_pred), _labels("group", group)
    if group.shape != y_true.shape:
        raise ValueError(f"group has {group.numel()} entries but there are {y_true.numel()} labels")
    values = sorted(torch.unique(group).tolist())
    correct = (y_true == y_pred).double()
    per_group = {int(v): float(correct[group == v].mean()) for v in values}
    gaps = gap_metrics(list(per_group.values()), float(correct.mean()) if correct.numel() else math.nan)
    return {"per_group": per_group, "group_var": gaps["cwv"], "group_gap": gaps["mcd"], "worst_group": gaps["worst"]}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits of ``model``, moved to ``device``, on ``x`` in eval mode (restores the previous mode)."""
    model.to(device)
    was_training = model.training
    model.eval()
    outputs = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
             group: torch.Tensor | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """class_metrics of ``model`` on (x, y), plus group_metrics when ``group`` is given."""
    y_pred = predict(model, x, device=device).argmax(dim=1) if len(x) else torch.empty(0, dtype=torch.long)
    metrics = class_metrics(y, y_pred, num_classes)
    if group is not None:
        metrics.update(group_metrics(y, y_pred, group))
    return metrics


def fairness_objective(metrics: dict[str, Any], mcd_weight: float) -> float:
    """acc - mcd_weight * MCD (higher is better): the score that validation-driven choices maximise."""
    return float(metrics["acc"] - mcd_weight * metrics["mcd"])


def shrunk_class_accuracy(per_class: list[float], counts: list[int], prior_images: float) -> list[float]:
    """Each class's accuracy shrunk toward the balanced accuracy b as if it had ``prior_images`` K more samples
    at b: (n_c * acc_c + K * b) / (n_c + K) (empirical Bayes). A class measured on few samples moves little from b;
    an absent one (NaN, n_c = 0) sits at b. With K = 0 the measured accuracies are returned, absent ones as b."""
    if len(counts) != len(per_class):
        raise ValueError(f"{len(per_class)} class accuracies but {len(counts)} class counts")
    prior = balanced_accuracy(per_class)
    if math.isnan(prior):
        raise ValueError("no class has a sample: class accuracies cannot be estimated")
    return [prior if n == 0 else (n * a + prior_images * prior) / (n + prior_images)
            for a, n in zip(per_class, counts)]


def fairness_class_weights(per_class: list[float], counts: list[int], floor: float,
                           prior_images: float = 0.0) -> torch.Tensor:
    """w_c proportional to 1 / max(acc_c, floor), normalised to mean 1, with acc_c from shrunk_class_accuracy
    (``counts``: each class's samples behind ``per_class``)."""
    estimates = shrunk_class_accuracy(per_class, counts, prior_images)
    raw = torch.tensor([1.0 / max(a, floor) for a in estimates], dtype=torch.float32)
    return raw / raw.mean()
