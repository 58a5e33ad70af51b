"""The two synthetic held-out sets of this study (npz files for `--dataset npz`), written to the folder given.

- c10.npz: 300 images of 3x32x32, 10 classes drawn uniformly, each a random prototype plus Gaussian noise (0.3).
- s20lt.npz: 481 images of 3x32x32, 20 classes long-tailed from 60 down to 6 images, each class a colour and a
  stripe direction under heavy noise (0.45).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def prototypes_with_noise(n: int = 300, classes: int = 10, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    prototypes = rng.random((classes, 3, 32, 32)).astype(np.float32)
    x = prototypes[y] + noise * rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    return np.clip(x, 0, 1).astype(np.float32), y


def long_tailed_stripes(classes: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    counts = np.round(60 * 10 ** (-np.arange(classes) / (classes - 1))).astype(int)
    y = np.concatenate([np.full(n, k) for k, n in enumerate(counts)])
    rng.shuffle(y)
    colours = rng.random((classes, 3)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    angles = np.pi * np.arange(classes) / classes
    stripes = np.stack([np.sin((np.cos(a) * rows + np.sin(a) * cols) / 2.0) for a in angles]).astype(np.float32)
    noise = rng.standard_normal((len(y), 3, 32, 32)).astype(np.float32)
    x = 0.3 * colours[y][:, :, None, None] + 0.25 * stripes[y][:, None] + 0.35 + 0.45 * noise
    return np.clip(x, 0, 1).astype(np.float32), y


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in (("c10", prototypes_with_noise()), ("s20lt", long_tailed_stripes())):
        np.savez(folder / f"{name}.npz", x=x, y=y)
        print(f"{folder / name}.npz: {x.shape[0]} images, {len(np.unique(y))} classes")
