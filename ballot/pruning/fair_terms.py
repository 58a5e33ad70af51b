"""Differentiable fairness terms added to a batch's loss by safecompress and fairscratch."""

from __future__ import annotations

import itertools

import torch


def class_loss_variance(per_sample_loss: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Variance (around their mean) of the per-class mean losses of the classes present in the batch.

    Zero when the batch holds fewer than two classes. A class-wise analogue of a parity penalty: it is small when
    every class is served about equally well."""
    sums = torch.zeros(num_classes, device=per_sample_loss.device, dtype=per_sample_loss.dtype)
    sums = sums.index_add(0, y, per_sample_loss)
    counts = torch.bincount(y, minlength=num_classes)
    present = counts > 0
    if int(present.sum()) < 2:
        return per_sample_loss.sum() * 0.0
    means = sums[present] / counts[present].to(per_sample_loss.dtype)
    return (means - means.mean()).pow(2).mean()


def group_parity_gap(logits: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Demographic-parity gap over a sensitive attribute: the total-variation distance between two groups' mean
    predicted class distributions, averaged over the pairs of groups present in the batch (zero with one group).

    For two groups and two classes this is |P(y_hat = 1 | a) - P(y_hat = 1 | b)| with soft predictions, the gap
    Fair Scratch Tickets' surrogates stand in for."""
    probs = torch.softmax(logits, dim=1)
    values = torch.unique(group)
    if len(values) < 2:
        return probs.sum() * 0.0
    means = torch.stack([probs[group == v].mean(dim=0) for v in values])
    gaps = [0.5 * (means[i] - means[j]).abs().sum() for i, j in itertools.combinations(range(len(values)), 2)]
    return torch.stack(gaps).mean()
