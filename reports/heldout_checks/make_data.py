"""The tabular held-out sets of these checks (npz files for `--dataset npz`), written to the folder given.

- cancer.npz: scikit-learn's breast-cancer data, 569 rows of 30 features, 2 classes.
- wine.npz: scikit-learn's wine data, 178 rows of 13 features, 3 classes.
- tab20lt.npz: `make_classification` with 20 classes and 40 features (20 informative), thinned to a long tail: class c
  is kept with probability 20^(-c/19), so from about 600 rows down to about 30.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_wine, make_classification


def long_tailed_tabular(classes: int = 20, ratio: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_classification(n_samples=12000, n_features=40, n_informative=20, n_redundant=5, n_classes=classes,
                               n_clusters_per_class=2, class_sep=1.5, random_state=0)
    keep = np.random.default_rng(0).random(len(y)) < ratio ** (-(y / (classes - 1)))
    return x[keep], y[keep]


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    folder.mkdir(parents=True, exist_ok=True)
    cancer, wine = load_breast_cancer(), load_wine()
    for name, (x, y) in (("cancer", (cancer.data, cancer.target)), ("wine", (wine.data, wine.target)),
                         ("tab20lt", long_tailed_tabular())):
        np.savez(folder / f"{name}.npz", x=x.astype(np.float32), y=y.astype(np.int64))
        print(f"{folder / name}.npz: {x.shape[0]} rows, {len(np.unique(y))} classes")
