"""Pieces shared by the baselines that run their own training loop (safecompress, fairscratch).

Their optimisers, schedules and losses differ from ``ballot.train.train`` (Nesterov SGD with milestones and a
mask that changes mid-run; SGD on scores through frozen weights), so they loop themselves; batching and the
progress bar are the same as there.
"""

from __future__ import annotations

from typing import Iterator

import torch
from tqdm.auto import tqdm

from ballot.train import batch_bounds


def batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device,
            avoid_single: bool = False) -> Iterator[torch.Tensor]:
    """Index tensors of one seeded pass over ``n`` samples (the last batch may be partial; with ``avoid_single``
    never of one sample: ``ballot.train.batch_bounds``), as ``train`` draws them."""
    order = torch.randperm(n, generator=generator).to(device)
    for begin, end in batch_bounds(n, batch_size, avoid_single):
        yield order[begin:end]


def epoch_bar(epochs: int, desc: str, progress: bool | None) -> tqdm:
    """The per-epoch progress bar ``train`` shows (None: only on a terminal)."""
    return tqdm(range(epochs), desc=desc, unit="epoch", disable=(not progress) if progress is not None else None,
                leave=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
