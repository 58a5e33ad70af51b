"""One cell's compare.json from runs of it in parts (other seeds or methods): `merge.py OUT PART...`.

Rows are keyed by (method, seed). The dense model of a seed is trained again by every part, so its rows must agree
exactly (the runs are deterministic); a key two parts disagree on, or parts run with different overrides, stop the
merge. Writes OUT/compare.json, compare.md, acc_vs_cwv.png and per_class.png as compare_methods.py does."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.compare_methods import markdown, plot, summarise  # noqa: E402
from benchmarks.variants import VARIANTS  # noqa: E402
from ballot.storage import write_json, write_text  # noqa: E402

COMPARED = ("method", "seed", "acc", "cwv", "mcd", "worst_class", "per_class", "val_acc", "val_cwv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("parts", type=Path, nargs="+", help="folders holding a compare.json each")
    args = parser.parse_args()
    merged: dict[tuple[str, int], dict] = {}
    overrides = None
    for part in args.parts:
        data = json.loads((part / "compare.json").read_text())
        if overrides is not None and sorted(data["overrides"]) != sorted(overrides):
            sys.exit(f"{part}: overrides {data['overrides']} differ from {overrides}")
        overrides = data["overrides"]
        for row in data["rows"]:
            key = (row["method"], row["seed"])
            if key in merged and any(merged[key][k] != row[k] for k in COMPARED):
                sys.exit(f"{part}: {key} differs from an earlier part's row")
            merged.setdefault(key, row)
    order = ["dense", *VARIANTS]  # the order compare_methods.py runs them in
    rows = sorted(merged.values(), key=lambda r: (order.index(r["method"]), r["seed"]))
    seeds = sorted({r["seed"] for r in rows})
    header = (f"# Method comparison merged from {len(args.parts)} runs, seeds {seeds}\n\nTest split; CWV unscaled "
              f"(accuracies are fractions). Overrides: {' '.join(overrides)}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "compare.md", markdown(summarise(rows), header))
    write_json(args.out / "compare.json", {"rows": rows, "overrides": overrides})
    plot(rows, args.out)
    print(markdown(summarise(rows), header))


if __name__ == "__main__":
    main()
