"""Wall time of `ballot prune` in two data-parallel processes against one, on CPU with one thread each.

Both runs use the same global batch, so they do the same optimiser steps; the ratio two / one is printed from
this one run (below 1 = the second process helps). Run it on an otherwise idle machine.

    python benchmarks/distributed_bench.py --dataset fashion-mnist --model cnn --method lth --max-train 6000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def timed_prune(flags: list[str], processes: int) -> float:
    """Seconds of one `ballot prune` with ``processes`` processes (one torch thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "ballot.cli", "prune", *flags, "--out", out, "--nproc", str(processes)]
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--method", default="lth", help="a data-parallel method: magnitude, lth, random, ballot")
    parser.add_argument("--max-train", type=int, help="cap on the training pool (data.max_train_samples)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every training phase")
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    args = parser.parse_args(argv)
    sets = [f"train_dense.epochs={args.epochs}", f"prune.retrain.epochs={args.epochs}",
            f"prune.ballot.obs_epochs={args.epochs}", f"prune.ballot.refine_train.epochs={args.epochs}",
            *(f"{group}.batch_size={args.batch_size}" for group in ("train_dense", "prune.retrain",
                                                                      "prune.ballot.refine_train")),
            *([f"data.max_train_samples={args.max_train}"] if args.max_train else [])]
    flags = ["--dataset", args.dataset, "--model", args.model, "--method", args.method, "--device", "cpu",
             *(flag for item in sets for flag in ("--set", item))]
    one = timed_prune(flags, 1)
    two = timed_prune(flags, 2)
    print(f"{args.dataset}/{args.model} {args.method}, {args.epochs} epochs a phase, global batch {args.batch_size}, "
          f"1 thread a process (cpu cores: {os.cpu_count()})")
    print(f"1 process:   {one:7.1f} s")
    print(f"2 processes: {two:7.1f} s   ratio 2/1 = {two / one:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
