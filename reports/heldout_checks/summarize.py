"""The README's results table from a `run.sh` output folder: `summarize.py OUT [--start rewind|best]`.

One row per cell: each method's mean validation and test accuracy / CWV x 1e3 over its seeds, then Ballot's test
accuracy change (points) and relative CWV change against LTH and against LTH + refined. The digits cells come from a
matrix run, which pins the rewound start: `--start best` reads its 'best' methods (the product's default since
`reports/refine_start/`) as Ballot and LTH + refined instead."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

METHODS = ("lth", "lth + refined", "ballot")
# the matrix's method names read as METHODS, per refined-training start
MATRIX_NAMES = {"rewind": {"lth": "lth", "lth + refined": "lth + refined", "ballot (blend)": "ballot"},
                "best": {"lth": "lth", "lth + refined best": "lth + refined", "ballot (blend) best": "ballot"}}


def _compare_start(row: dict) -> str | None:
    """The start a compare row's refined training took, read from its final_choice record ('best': theta_T's
    survivors competed); None for rows written before compare_methods.py kept the record."""
    if "final_choice" not in row:
        return None
    return "best" if "refined from theta_T" in (row["final_choice"] or {}).get("objectives", {}) else "rewind"


def _cells(out: Path, start: str) -> dict[str, dict[str, list[dict[str, float]]]]:
    """cell name -> method -> one {val_acc, val_cwv, acc, cwv} per seed; warns of a compare row whose recorded
    start is not ``start``."""
    cells: dict[str, dict[str, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    matrix = out / "digits" / "matrix.json"
    for row in json.loads(matrix.read_text())["rows"] if matrix.is_file() else []:
        method = MATRIX_NAMES[start].get(row["method"])
        if method in METHODS:
            name = f"digits {row['unit']['model']} d{row['density']}"
            cells[name][method].append({"val_acc": row["val"]["acc"], "val_cwv": row["val"]["cwv"],
                                        "acc": row["test"]["acc"], "cwv": row["test"]["cwv"]})
    for compare in sorted(out.glob("*/compare.json")):
        for row in json.loads(compare.read_text())["rows"]:
            ran = _compare_start(row) if row["method"] != "lth" else None  # plain LTH has no refined training
            if ran is not None and ran != start:
                print(f"warning: {compare.parent.name} {row['method']} seed {row['seed']} ran with the '{ran}' start, "
                      f"not '{start}'", file=sys.stderr)
            if row["method"] in METHODS:
                cells[compare.parent.name][row["method"]].append({k: row[k] for k in ("val_acc", "val_cwv", "acc", "cwv")})
    return cells


def _mean(runs: list[dict[str, float]], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def _change(ours: float, theirs: float) -> str:
    return f"{100 * (ours / theirs - 1):+.0f}%" if theirs > 0 else ("level" if ours == 0 else "n/a")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--start", choices=tuple(MATRIX_NAMES), default="rewind")
    args = parser.parse_args()
    cells = _cells(args.out, args.start)
    print("| cell | seeds | " + " | ".join(f"{m} val / test" for m in METHODS)
          + " | Ballot vs LTH: acc, CWV | vs LTH + refined: acc, CWV |")
    print("|---" * (len(METHODS) + 4) + "|")
    for name, by_method in cells.items():
        if not all(m in by_method for m in METHODS):
            print(f"warning: {name} skipped, it lacks {[m for m in METHODS if m not in by_method]}", file=sys.stderr)
            continue
        entries = [f"{_mean(by_method[m], 'val_acc'):.3f} / {1e3 * _mean(by_method[m], 'val_cwv'):.1f}, "
                   f"{_mean(by_method[m], 'acc'):.3f} / {1e3 * _mean(by_method[m], 'cwv'):.1f}" for m in METHODS]
        ours = by_method["ballot"]
        versus = [f"{100 * (_mean(ours, 'acc') - _mean(by_method[m], 'acc')):+.2f}, "
                  f"{_change(_mean(ours, 'cwv'), _mean(by_method[m], 'cwv'))}" for m in ("lth", "lth + refined")]
        print(f"| {name} | {len(ours)} | " + " | ".join(entries + versus) + " |")


if __name__ == "__main__":
    main()
