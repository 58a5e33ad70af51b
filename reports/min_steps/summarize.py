"""Seed means of the min_steps study (run.sh): per cell and arm, the dense model's test accuracy, LTH's and Ballot's
validation accuracy and balanced accuracy, test accuracy and test CWV."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean

from ballot.fairness import balanced_accuracy

CELLS = ("digits-lt-cnn", "s20lt-cnn", "c10-cnn", "digits-lt-mlp")
ARMS = {"unfloored": "20 epochs (min_steps 0)", "floored": "min_steps 500"}


def runs(out: Path, arm: str, cell: str, method: str) -> list[dict]:
    paths = (out / arm / f"{cell}_{seed}_{method}" / "metrics.json" for seed in range(3))
    return [json.loads(p.read_text()) for p in paths if p.is_file()]


def figures(metrics: list[dict]) -> str:
    if not metrics:
        return "-"
    return (f"{mean(m['val']['acc'] for m in metrics):.3f} / {mean(balanced_accuracy(m['val']['per_class']) for m in metrics):.3f}, "
            f"{mean(m['acc'] for m in metrics):.3f}, {1e3 * mean(m['cwv'] for m in metrics):.0f} ({len(metrics)})")


def main(out: Path) -> None:
    print("| cell | schedules | dense test acc | LTH: val acc / bacc, test acc, test CWV e-3 (seeds) | Ballot: same |")
    print("|---|---|---|---|---|")
    for cell in CELLS:
        for arm, label in ARMS.items():
            lth, ballot = runs(out, arm, cell, "lth"), runs(out, arm, cell, "ballot")
            both = lth + ballot
            if not both:
                continue
            dense = mean(m["dense"]["acc"] for m in both)
            print(f"| {cell} | {label} | {dense:.3f} | {figures(lth)} | {figures(ballot)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
