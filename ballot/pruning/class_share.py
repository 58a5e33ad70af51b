"""Per-class saliency retention (Ballot's conflict rule 'share'): how much each class relies on each weight.

A class's saliency of a surviving weight is the first-order Taylor estimate |w * dL_c/dw| of the loss L_c on that
class's samples, normalised over the layer's surviving weights so that every class, rare or common, fit or not,
holds the same total. A weight's *share* is its largest normalised saliency over the classes, times the number of
survivors (1 = an even share): high where some class leans on the weight far more than on the rest of the layer,
even when accuracy over all samples (the magnitude votes) would drop it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ballot.data import Split


class ClassShareProbe:
    """A fixed, class-balanced probe of training samples (``per_class`` of each class, seeded), and the shares
    of the surviving weights measured on it, one backward pass per class."""

    def __init__(self, data: Split, num_classes: int, per_class: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for label in range(num_classes):
            index = torch.nonzero(data.y == label).flatten()
            chosen = index[torch.randperm(len(index), generator=generator)[:per_class]]
            if len(chosen):
                self.batches.append((data.x[chosen], data.y[chosen]))

    def shares(self, model: nn.Module, params: list[nn.Parameter], within: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each surviving weight's largest normalised class saliency, in units of an even share (0 elsewhere).
        Runs the model in eval mode (BatchNorm's running statistics, not a one-class batch's) and leaves the
        parameters' .grad untouched."""
        was_training = model.training
        model.eval()
        device = params[0].device
        best = [torch.zeros_like(p) for p in params]
        for x, y in self.batches:
            with torch.enable_grad():  # a ballot is cast under no_grad
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                grads = torch.autograd.grad(loss, params)
            for top, p, grad, keep in zip(best, params, grads, within):
                saliency = (p.detach() * grad).abs() * keep
                total = saliency.sum()
                if total > 0:
                    torch.maximum(top, saliency * (keep.sum() / total), out=top)
        model.train(was_training)
        return best
