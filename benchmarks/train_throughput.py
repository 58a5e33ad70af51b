"""Samples/s of ballot's masked training loop against a bare PyTorch loop on the same model and data.

Both loops run the same number of epochs, alternately (bare, masked, bare, ...), so that background load
hits both alike; the ratio masked / bare is printed from this one run (aim: >= 0.8).

    python benchmarks/train_throughput.py --dataset fashion-mnist --model mlp --epochs 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ballot.config import DataConfig, TrainConfig
from ballot.data import Split, load_data
from ballot.masks import Mask, magnitude_scores
from ballot.models import build_model
from ballot.train import resolve_device, train


def bare_epoch(model: torch.nn.Module, data: Split, cfg: TrainConfig, seed: int, device: torch.device) -> float:
    """One epoch of the plainest PyTorch loop (no mask, no schedule, no bookkeeping); returns seconds."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x_all, y_all = data.x.to(device), data.y.to(device)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).to(device)
    model.train()
    start = time.perf_counter()
    for i in range(0, len(data), cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loop")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    data = load_data(args.dataset, DataConfig(), seed=0)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, schedule="constant")
    torch.manual_seed(0)
    bare_model = build_model(args.model, data.input_shape, data.num_classes).to(device)
    masked_model = build_model(args.model, data.input_shape, data.num_classes).to(device)
    mask = Mask.top_k(magnitude_scores(masked_model), args.density)
    bare_epoch(bare_model, data.train, cfg, 0, device)  # warm-up
    bare_times, masked_times = [], []
    for epoch in range(args.epochs):
        bare_times.append(bare_epoch(bare_model, data.train, cfg, epoch, device))
        result = train(masked_model, data.train, cfg, seed=epoch, mask=mask, device=device, progress=False)
        masked_times.append(result.seconds)
    n = len(data.train)
    bare_rate, masked_rate = n / statistics.median(bare_times), n / statistics.median(masked_times)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.dataset} train {n}, {args.model}, "
          f"batch {args.batch_size}, density {args.density}, {args.epochs} epochs each (median)")
    print(f"bare PyTorch loop : {bare_rate:10.0f} samples/s")
    print(f"ballot masked loop: {masked_rate:10.0f} samples/s")
    print(f"ratio masked / bare: {masked_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
