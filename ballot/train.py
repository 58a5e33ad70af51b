"""The one training loop: optimiser, per-step learning-rate schedule, mask enforcement, rewind state, hooks."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn
from tqdm.auto import tqdm

from ballot import distributed
from ballot.config import TrainConfig
from ballot.data import Split
from ballot.masks import Mask


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' gives cuda when available, else cpu; anything else is passed to torch.device. With several processes
    on GPUs, each takes its own (cuda:LOCAL_RANK)."""
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available")
    device = distributed.local_device(device)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s)")
    return device


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators, and keep cuDNN to its deterministic algorithms (docs/decisions.md)."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


@dataclass
class Batch:
    """This process's share of one global mini-batch: per-sample losses, labels, and the global sums that
    normalise a loss so that the processes' gradients add up to the single-process gradient."""

    per_sample: torch.Tensor
    y: torch.Tensor
    global_size: int
    scaler: torch.amp.GradScaler | None = None  # the step's fp16 gradient scaler

    def gradient(self, params: Sequence[torch.Tensor], class_weights: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, ...]:
        """d loss(class_weights) / d params by an extra backward through the step's graph (kept for the step's own
        backward); under fp16 the loss is scaled as the step's is, against underflow, and the gradient unscaled."""
        loss = self.loss(class_weights)
        if self.scaler is None:
            return torch.autograd.grad(loss, params, retain_graph=True)
        grads = torch.autograd.grad(self.scaler.scale(loss), params, retain_graph=True)
        scale = self.scaler.get_scale()
        return tuple(grad / scale for grad in grads)

    def loss(self, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The (class-weighted) mean loss over the global batch, restricted to this process's samples."""
        if class_weights is None:
            return self.per_sample.sum() / self.global_size
        w = class_weights.to(self.y.device)[self.y]
        return (self.per_sample * w).sum() / distributed.all_reduce_sum(w.sum().detach().clone())


class StepHook(Protocol):
    """Observes training steps; Ballot's gradient collection is one. ``after_backward`` sees the step's gradient
    (unscaled, and summed over the processes), ``after_step`` the weights the step left (pruned ones zero)."""

    def before_backward(self, step: int, batch: Batch) -> None: ...

    def after_backward(self, step: int) -> None: ...

    def after_step(self, step: int) -> None: ...


class Precision:
    """fp32, or autocast to bf16/fp16 (fp16 with a gradient scaler, unscaled before the hooks see it)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skipped when the gradient overflowed
        self.scaler.update()


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    rewind_state: dict[str, torch.Tensor] | None = None
    steps: int = 0
    seconds: float = 0.0
    # set when final trainings competed (prune.ballot.refine_start 'best', refine_guard): {"kept": label,
    # "objectives": {label: validation objective}}
    final_choice: dict[str, Any] | None = None


def steps_per_epoch(samples: int, batch_size: int) -> int:
    """Optimiser steps in one pass over ``samples`` (the last batch may be partial)."""
    return max(1, math.ceil(samples / batch_size))


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer: one that sees 1x1 maps cannot normalise a one-sample batch."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def batch_bounds(samples: int, batch_size: int, avoid_single: bool = False) -> list[tuple[int, int]]:
    """(start, stop) of each of an epoch's ``steps_per_epoch`` batches. With ``avoid_single`` (``has_batchnorm``) a
    last batch of one sample is avoided by splitting the last two batches' samples evenly: the same number of steps,
    so no schedule moves; only an epoch of samples % batch_size == 1 changes (no recorded BatchNorm cell has one)."""
    bounds = [(start, min(start + batch_size, samples)) for start in range(0, samples, batch_size)]
    if avoid_single and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        start = bounds[-2][0]
        middle = start + (samples - start + 1) // 2
        bounds[-2:] = [(start, middle), (middle, samples)]
    return bounds


def floor_epochs(epochs: int, per_epoch: int, min_steps: int) -> int:
    """``epochs``, raised so that ``epochs x per_epoch`` reaches ``min_steps`` (0 epochs stay 0: no training)."""
    return max(epochs, math.ceil(min_steps / per_epoch)) if epochs else 0


def floored(cfg: Any, samples: int) -> Any:
    """A config with ``epochs``, ``batch_size`` and ``min_steps`` (SafeCompress, FairScratch) whose epochs reach
    ``min_steps`` optimiser steps on ``samples`` training samples (their other settings are fractions of it)."""
    return dataclasses.replace(cfg, epochs=floor_epochs(cfg.epochs, steps_per_epoch(samples, cfg.batch_size),
                                                        cfg.min_steps))


def stretched(cfg: TrainConfig, samples: int) -> TrainConfig:
    """``cfg`` as it runs on ``samples`` training samples: when its epochs make fewer than ``cfg.min_steps``
    optimiser steps, the epochs and every setting counted in epochs (warm-up, step length, patience) are scaled by
    the same factor, so the schedule keeps its shape on a small data set."""
    epochs = floor_epochs(cfg.epochs, steps_per_epoch(samples, cfg.batch_size), cfg.min_steps)
    if epochs == cfg.epochs:
        return cfg
    factor = epochs / cfg.epochs
    return dataclasses.replace(cfg, epochs=epochs, warmup_epochs=cfg.warmup_epochs * factor,
                               step_epochs=max(1, round(cfg.step_epochs * factor)),
                               patience=round(cfg.patience * factor))


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


def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Every BatchNorm layer's running statistics re-estimated as plain averages over ``x`` in one forward pass of
    near-equal batches (torch's ``update_bn``; weights untouched). Training leaves a moving average over its last
    steps, taken while the weights still moved; on small data (a few steps an epoch) a pruned model evaluated with it
    can fall far below what its weights reach. Models without BatchNorm are unchanged."""
    if len(x) == 0:
        return
    size = math.ceil(len(x) / math.ceil(len(x) / batch_size))
    device = next(model.parameters()).device
    update_bn((x[i:i + size] for i in range(0, len(x), size)), model, device=device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The whole split on the training device once (from pinned host memory, without blocking, onto a GPU)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when several processes run (else ``model`` itself)."""
    if not distributed.active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _syncs_batchnorm(device: torch.device) -> bool:
    """Whether training on ``device`` swaps BatchNorm for SyncBatchNorm: several processes, on GPUs."""
    return distributed.active() and device.type == "cuda"


@contextlib.contextmanager
def _synced_batchnorm(model: nn.Module, device: torch.device) -> Iterator[None]:
    """While the block runs, with several processes on GPUs, ``model``'s BatchNorm layers are SyncBatchNorm layers
    sharing their parameters and buffers, so each normalises a step with the whole global batch's statistics, as one
    process does; the original layers are put back after, so state dicts, masks and exports never see SyncBatchNorm.
    torch's SyncBatchNorm takes GPU tensors only: on CPUs (gloo) each process normalises with its own share's.
    ``model`` moves to ``device`` first: moving replaces buffers, so a move inside the block would leave the original
    layers' statistics behind, untrained and on the old device."""
    model.to(device)
    layers = ({name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
              if _syncs_batchnorm(device) else {})
    for name, layer in layers.items():
        model.set_submodule(name, nn.SyncBatchNorm.convert_sync_batchnorm(layer))
    try:
        yield
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)


class _Steps:
    """The moving parts of one training run: the (data-parallel) model, optimiser, precision, mask enforcement and
    the split on the device; ``step`` is one optimiser step on this process's share of a global batch."""

    def __init__(self, model: nn.Module, data: Split, cfg: TrainConfig, mask: Mask | None, device: torch.device,
                 class_weights: torch.Tensor | None, weights_start: int, hook: StepHook | None) -> None:
        model.train()  # already on ``device``: _synced_batchnorm moved it
        self.bound = mask.on(model) if mask is not None else None
        if self.bound is not None:
            self.bound.zero_weights()
        self.net, self.optimizer = _parallel(model, device), make_optimizer(model, cfg)
        self.precision, self.hook, self.device = Precision(cfg.precision, device), hook, device
        self.x, self.y = _to_device(data.x, device), _to_device(data.y, device)
        self.weights = class_weights.to(device) if class_weights is not None else None
        self.weights_start = weights_start  # steps before it train on plain CE
        self.world, self.rank = distributed.world_size(), distributed.rank()

    def step(self, number: int, idx: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimiser step ``number`` on the global batch ``idx`` at learning rate ``lr``; returns this process's
        summed loss and correct predictions."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mine = idx[self.rank::self.world].to(self.device)
        x, y = self.x[mine], self.y[mine]
        with self.precision.autocast():
            logits = self.net(x)
            per_sample = F.cross_entropy(logits.float(), y, reduction="none")
        batch = Batch(per_sample, y, len(idx), self.precision.scaler)
        weights = self.weights if number >= self.weights_start else None
        loss = batch.loss(weights) * self.world  # DistributedDataParallel averages: x world restores the sum
        if self.hook is not None:
            self.hook.before_backward(number, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.unscale(self.optimizer)
        if self.hook is not None:
            self.hook.after_backward(number)
        if self.bound is not None:
            self.bound.zero_grads()
        self.precision.step(self.optimizer)
        if self.bound is not None:
            self.bound.zero_weights()
        if self.hook is not None:
            self.hook.after_step(number)
        return per_sample.detach().sum(), (logits.detach().argmax(1) == y).sum()


def _progress(epochs: int, desc: str, progress: bool | None) -> Any:
    """The epoch bar: None shows it only on a terminal, and only rank 0 ever shows it."""
    hidden = (not progress) if progress is not None else None
    return tqdm(range(epochs), desc=desc, unit="epoch", disable=hidden if distributed.is_main() else True, leave=False)


def train(model: nn.Module, data: Split, cfg: TrainConfig, *, seed: int = 0, mask: Mask | None = None,
          device: torch.device | str = "cpu", class_weights: torch.Tensor | None = None,
          class_weights_from: float = 0.0, rewind_iter: int | None = None, hook: StepHook | None = None,
          epoch_metric: Callable[[nn.Module], float] | None = None, desc: str = "train",
          progress: bool | None = None) -> TrainResult:
    """Train ``model`` in place on ``data``.

    - ``mask``: pruned weights are zeroed before training and kept exactly zero after every step
      (their gradients are zeroed too, so momentum and weight decay never move them).
    - ``class_weights``: per-class loss weights (a fairness-weighted cross-entropy); None = plain CE.
    - ``class_weights_from``: fraction of the steps trained on plain CE before ``class_weights`` apply (deferred
      re-weighting).
    - ``rewind_iter``: the returned ``rewind_state`` is a copy of the state after that many steps.
    - ``epoch_metric``: called after each epoch (higher is better); drives the 'plateau' schedule.
    - ``progress``: None shows a bar only on a terminal (on rank 0 only when several processes run).

    Under torch.distributed (docs/scale.md) every process draws the same seeded order, takes every
    world-size-th sample of each global batch of ``cfg.batch_size`` and trains a DistributedDataParallel copy, so
    the steps are the single-process steps up to floating-point reduction order; for a model with BatchNorm, on GPUs
    only (``_synced_batchnorm``).
    """
    if cfg.schedule == "plateau" and epoch_metric is None:
        raise ValueError("schedule 'plateau' needs an epoch_metric (a validation objective)")
    if len(data) == 0:
        raise ValueError("cannot train on an empty split")
    device = torch.device(device)
    cfg = stretched(cfg, len(data))
    n, per_epoch = len(data), steps_per_epoch(len(data), cfg.batch_size)
    bounds = batch_bounds(n, cfg.batch_size, avoid_single=has_batchnorm(model))
    weights_start = round(class_weights_from * cfg.epochs * per_epoch)
    with _synced_batchnorm(model, device):
        steps = _Steps(model, data, cfg, mask, device, class_weights, weights_start, hook)
        generator, plateau, result = torch.Generator().manual_seed(seed), _Plateau(cfg), TrainResult()
        if rewind_iter == 0:
            result.rewind_state = copy.deepcopy(model.state_dict())
        start = time.perf_counter()
        bar = _progress(cfg.epochs, desc, progress)
        for epoch in bar:
            order = torch.randperm(n, generator=generator)
            totals = torch.zeros(2, device=device)  # summed loss, correct predictions
            for begin, end in bounds:
                lr = cfg.lr * lr_factor(cfg, result.steps, per_epoch) * plateau.scale
                loss, correct = steps.step(result.steps, order[begin:end], lr)
                result.steps += 1
                totals[0] += loss
                totals[1] += correct
                if rewind_iter is not None and result.steps == rewind_iter:
                    result.rewind_state = copy.deepcopy(model.state_dict())
            distributed.all_reduce_sum(totals)
            record = {"epoch": epoch + 1, "lr": lr, "train_loss": float(totals[0]) / n,
                      "train_acc": float(totals[1]) / n}
            if epoch_metric is not None:
                value = torch.tensor([epoch_metric(model)], dtype=torch.float64, device=device)
                record["val_metric"] = float(distributed.broadcast(value).cpu())  # rank 0's: the plateau steps alike
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
