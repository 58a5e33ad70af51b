"""Ballot's runs with raw class weights (K = 0) against shrunk ones (K = 10) on the small cells, seed by seed:
`small_cells.py K0_DIR K10_DIR` (folders of CELL_SEED_ballot/metrics.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ballot.fairness import balanced_accuracy

CELLS = ("digits-lt-mlp", "digits-lt-cnn", "s20lt-cnn", "c10-cnn")


def figures(path: Path) -> str:
    if not path.is_file():
        return "-"
    m = json.loads(path.read_text())
    return (f"{m['val']['acc']:.3f} / {balanced_accuracy(m['val']['per_class']):.3f}, "
            f"{m['acc']:.3f}, {1e3 * m['cwv']:.0f}")


def main(raw: Path, shrunk: Path) -> None:
    print("| cell | seed | K = 0: val acc / bacc, test acc, test CWV e-3 | K = 10: same |")
    print("|---|---|---|---|")
    for cell in CELLS:
        for seed in range(3):
            name = f"{cell}_{seed}_ballot/metrics.json"
            print(f"| {cell} | {seed} | {figures(raw / name)} | {figures(shrunk / name)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
