"""The one training loop: optimiser, per-step learning-rate schedule, mask enforcement, rewind state, hooks."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ballot.config import TrainConfig
from ballot.data import Split
from ballot.masks import Mask


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' gives cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


class StepHook(Protocol):
    """Observes training steps; Ballot's gradient collection is one."""

    def before_backward(self, step: int, per_sample_loss: torch.Tensor, y: torch.Tensor) -> None: ...

    def after_backward(self, step: int) -> None: ...


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    rewind_state: dict[str, torch.Tensor] | None = None
    steps: int = 0
    seconds: float = 0.0


def steps_per_epoch(samples: int, batch_size: int) -> int:
    """Optimiser steps in one pass over ``samples`` (the last batch may be partial)."""
    return max(1, math.ceil(samples / batch_size))


def lr_factor(cfg: TrainConfig, step: int, per_epoch: int) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (warm-up, then the schedule's decay)."""
    warmup = int(round(cfg.warmup_epochs * per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        total = max(cfg.epochs * per_epoch - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total) / total))
    if cfg.schedule == "step":
        return cfg.gamma ** (step // (cfg.step_epochs * per_epoch))
    return 1.0  # constant, and plateau (whose decay is applied per epoch)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class _Plateau:
    """Decays the lr by ``gamma`` after ``patience`` epochs without a better (higher) metric."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.best, self.bad_epochs, self.scale = cfg, -math.inf, 0, 1.0

    def update(self, metric: float) -> None:
        if metric > self.best + 1e-6:
            self.best, self.bad_epochs = metric, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.cfg.patience:
            self.scale *= self.cfg.gamma
            self.bad_epochs = 0


def train(model: nn.Module, data: Split, cfg: TrainConfig, *, seed: int = 0, mask: Mask | None = None,
          device: torch.device | str = "cpu", class_weights: torch.Tensor | None = None,
          rewind_iter: int | None = None, hook: StepHook | None = None,
          epoch_metric: Callable[[nn.Module], float] | None = None, desc: str = "train",
          progress: bool | None = None) -> TrainResult:
    """Train ``model`` in place on ``data``.

    - ``mask``: pruned weights are zeroed before training and kept exactly zero after every step
      (their gradients are zeroed too, so momentum and weight decay never move them).
    - ``class_weights``: per-class loss weights (a fairness-weighted cross-entropy); None = plain CE.
    - ``rewind_iter``: the returned ``rewind_state`` is a copy of the state after that many steps.
    - ``epoch_metric``: called after each epoch (higher is better); drives the 'plateau' schedule.
    - ``progress``: None shows a bar only on a terminal.
    """
    if cfg.schedule == "plateau" and epoch_metric is None:
        raise ValueError("schedule 'plateau' needs an epoch_metric (a validation objective)")
    if len(data) == 0:
        raise ValueError("cannot train on an empty split")
    device = torch.device(device)
    model.to(device).train()
    bound = mask.on(model) if mask is not None else None
    if bound is not None:
        bound.zero_weights()
    optimizer = make_optimizer(model, cfg)
    x_all, y_all = data.x.to(device), data.y.to(device)
    weights = class_weights.to(device) if class_weights is not None else None
    n = len(data)
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    generator = torch.Generator().manual_seed(seed)
    plateau = _Plateau(cfg)
    result = TrainResult()
    if rewind_iter == 0:
        result.rewind_state = copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=(not progress) if progress is not None else None,
               leave=False)
    for epoch in bar:
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x, y = x_all[idx], y_all[idx]
            lr = cfg.lr * lr_factor(cfg, result.steps, per_epoch) * plateau.scale
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(x)
            per_sample = F.cross_entropy(logits, y, reduction="none")
            if weights is None:
                loss = per_sample.mean()
            else:
                sample_weights = weights[y]
                loss = (per_sample * sample_weights).sum() / sample_weights.sum()
            if hook is not None:
                hook.before_backward(result.steps, per_sample, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if hook is not None:
                hook.after_backward(result.steps)
            if bound is not None:
                bound.zero_grads()
            optimizer.step()
            if bound is not None:
                bound.zero_weights()
            result.steps += 1
            loss_sum += per_sample.detach().sum()
            correct += (logits.detach().argmax(1) == y).sum()
            if rewind_iter is not None and result.steps == rewind_iter:
                result.rewind_state = copy.deepcopy(model.state_dict())
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": float(loss_sum) / n, "train_acc": float(correct) / n}
        if epoch_metric is not None:
            record["val_metric"] = float(epoch_metric(model))
            model.train()
            if cfg.schedule == "plateau":
                plateau.update(record["val_metric"])
        result.history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_acc']:.3f}")
    if rewind_iter is not None and result.rewind_state is None:
        result.rewind_state = copy.deepcopy(model.state_dict())  # training was shorter than rewind_iter
    result.seconds = time.perf_counter() - start
    model.eval()
    return result
