"""The refine guard replayed from matrix records: `guard.py [--split val|test] [--balanced] RUNS_DIR...`.

For every seed-cell with both a refined and a plain final training of the same mask (`ballot (blend)` and
`ballot (blend) plain`; `lth + refined` and `lth`), the guarded result is the one with the higher *validation*
objective, val acc - 0.5 x val MCD (ties: refined), as `prune.ballot.refine_guard` keeps it. Prints, per cell, the
refined arm against the guarded one on the chosen split (accuracy in points, CWV x 1e3, mean over seeds), how many
seeds kept the plain training, and the averages over cells: the accuracy change and the change of the cell-averaged
CWV (as `benchmarks/paired.py` computes it) and the mean of the per-cell relative CWV changes. Last, Ballot against
LTH + refined over the cells both ran, without the guard and with it on both. `--balanced` replays a guard whose
objective takes the mean per-class validation accuracy instead of the accuracy (exploratory: not what the knob does)."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from paired import seed_records  # noqa: E402

ARMS = {"ballot": ("ballot (blend)", "ballot (blend) plain"), "lth": ("lth + refined", "lth")}
MCD_WEIGHT = 0.5  # prune.ballot.objective_mcd_weight


def objective(record: dict, balanced: bool = False) -> float:
    val = record["val"]
    return (statistics.fmean(val["per_class"]) if balanced else val["acc"]) - MCD_WEIGHT * val["mcd"]


def pick(first: dict, second: dict, balanced: bool = False) -> dict:
    """The run a competing final training keeps: ``second`` only if its validation objective is higher."""
    return second if objective(second, balanced) > objective(first, balanced) else first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--balanced", action="store_true", help="objective on the mean per-class accuracy")
    args = parser.parse_args()
    outcome = replay(seed_records(args.runs), ARMS, args.split, args.balanced)
    versus(outcome, "the guard")


def versus(outcome: dict[str, dict[tuple, tuple[list[float], list[float]]]], label: str) -> None:
    """Ballot against LTH + refined over the cells both arms replayed: without ``label`` and with it on both."""
    both = sorted(set(outcome["ballot"]) & set(outcome["lth"]))
    for i, which in ((0, f"without {label}"), (1, f"with {label} on both")):
        cells = [([outcome["lth"][c][0][i], outcome["ballot"][c][0][i]],
                  [outcome["lth"][c][1][i], outcome["ballot"][c][1][i]]) for c in both]
        _averages(cells, 0, 1, f"ballot - lth + refined, {which}, {len(cells)} cells")


def replay(seeds: dict, arms: dict[str, tuple[str, str]], split: str, balanced: bool = False,
           other: str = "plain", label: str = "guard") -> dict[str, dict[tuple, tuple[list[float], list[float]]]]:
    """Per arm (name: (kept on ties, the other)), per cell: the tie-kept method's mean (accuracy, CWV) against the
    mean of whichever of the two has the higher validation objective in each seed; printed with the averages."""
    outcome: dict[str, dict[tuple, tuple[list[float], list[float]]]] = {}
    for arm, (first, second) in arms.items():
        print(f"\n{arm}: {first} against the {label}'s pick ({split}; acc in points, CWV x 1e3)")
        print(f"{'cell':24} {'n':>2} {other:>7} {'acc':>6} {label:>7} {'CWV':>6} {label:>7}")
        outcome[arm] = {}
        for cell in sorted(seeds):
            pairs = [(s[first], s[second]) for s in seeds[cell].values() if first in s and second in s]
            if not pairs:
                continue
            picks = [pick(a, b, balanced) for a, b in pairs]
            rows = ([a for a, _ in pairs], picks)
            acc = [statistics.fmean(100 * r[split]["acc"] for r in arm_rows) for arm_rows in rows]
            cwv = [statistics.fmean(1e3 * r[split]["cwv"] for r in arm_rows) for arm_rows in rows]
            switched = sum(pick is b for pick, (_, b) in zip(picks, pairs))
            outcome[arm][cell] = (acc, cwv)
            name = "/".join(map(str, cell))
            print(f"{name:24} {len(pairs):>2} {switched:>7} {acc[0]:6.1f} {acc[1]:7.1f} {cwv[0]:6.1f} {cwv[1]:7.1f}")
        _averages(list(outcome[arm].values()), 0, 1, f"{len(outcome[arm])} cells, {label} - {first}")
    return outcome


def _averages(cells: list[tuple[list[float], list[float]]], a: int, b: int, label: str) -> None:
    """Print B - A over ``cells`` ((acc, cwv) lists indexed by arm): accuracy and cell-averaged / per-cell CWV."""
    if not cells:
        return
    d_acc = statistics.fmean(acc[b] - acc[a] for acc, _ in cells)
    mean_a, mean_b = (statistics.fmean(cwv[i] for _, cwv in cells) for i in (a, b))
    relative = statistics.fmean(cwv[b] / cwv[a] - 1 for _, cwv in cells)
    print(f"{label}: accuracy {d_acc:+.2f} points; cell-averaged CWV {mean_a:.2f} -> {mean_b:.2f} "
          f"({100 * (mean_b / mean_a - 1):+.1f}%); mean per-cell CWV change {100 * relative:+.1f}%")

if __name__ == "__main__":
    main()
