"""The per-run choice of the start replayed from matrix records: `choose.py [--split val|test] RUNS_DIR...`.

For every seed-cell with both starts of the same mask (`ballot (blend)` and `ballot (blend) lrr`; `lth + refined`
and `lth + refined lrr`), the chosen run is the one with the higher *validation* objective, val acc - 0.5 x val MCD
(ties: the rewound start), as a run with `prune.ballot.refine_start: best` trains both starts and keeps the better.
Prints, per cell, the rewound arm against the choice on the chosen split and the averages (as
`reports/refine_guard/guard.py`, whose replay this is), then Ballot against LTH + refined without the choice and with
it on both, and last the issue's targets against plain LTH on the seed-cells where all three methods ran."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / folder) for folder in ("benchmarks", "reports/refine_guard")]
from guard import pick, replay, versus  # noqa: E402
from paired import seed_records  # noqa: E402

ARMS = {"ballot": ("ballot (blend)", "ballot (blend) lrr"), "lth": ("lth + refined", "lth + refined lrr")}


def chosen(runs: dict[str, dict], arm: str, choose: bool) -> dict:
    """The arm's rewound run, or with ``choose`` the run of the start with the higher validation objective."""
    rewound, trained = (runs[name] for name in ARMS[arm])
    return pick(rewound, trained) if choose else rewound


def targets(seeds: dict, split: str) -> None:
    """Ballot against plain LTH and LTH + refined (the same start rule on both), each cell's seed means, on the
    seed-cells with all five runs: cells within 1 point of LTH, with CWV at most LTH's, and the mean per-cell CWV
    reductions."""
    needed = {"lth", *ARMS["ballot"], *ARMS["lth"]}
    for choose, label in ((False, "rewind (the recorded product)"), (True, "the choice on both")):
        cells = []
        for by_seed in seeds.values():
            full = [runs for runs in by_seed.values() if needed <= set(runs)]
            if full:
                trio = [[r["lth"] for r in full], [chosen(r, "ballot", choose) for r in full],
                        [chosen(r, "lth", choose) for r in full]]
                cells.append([tuple(statistics.fmean(row[split][key] for row in rows) for key in ("acc", "cwv"))
                              for rows in trio])
        close = sum(ballot[0] >= lth[0] - 0.01 for lth, ballot, _ in cells)
        fairer = sum(ballot[1] <= lth[1] for lth, ballot, _ in cells)
        vs_lth = statistics.fmean(1 - ballot[1] / lth[1] for lth, ballot, _ in cells)
        vs_refined = statistics.fmean(1 - ballot[1] / refined[1] for _, ballot, refined in cells)
        print(f"targets, {label}, {len(cells)} cells ({split}): accuracy within 1 point of LTH in {close}, CWV <= "
              f"LTH's in {fairer}; mean per-cell CWV reduction vs LTH {100 * vs_lth:.1f}%, vs LTH + refined "
              f"{100 * vs_refined:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    args = parser.parse_args()
    seeds = seed_records(args.runs)
    versus(replay(seeds, ARMS, args.split, other="trained", label="choice"), "the choice")
    targets(seeds, args.split)


if __name__ == "__main__":
    main()
