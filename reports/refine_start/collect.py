"""Per-seed rows and breakdowns: `collect.py RUNS_DIR METHOD... [--model cnn]`.

Prints, for every seed-cell of ``--model`` that all METHODs ran, each method's validation and test accuracy / CWV x
1e3; then, per method over all its seed-cells, the breakdowns: seed-cells whose accuracy is more than 8 points below
their own dense model's (the rule of `reports/robustness/` and `reports/deferred_weights/`), on validation and on
test."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MARGIN = 0.08  # accuracy below the seed's dense model that counts as a breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path)
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--model", default="cnn", help="the model whose seed-cells get a row each")
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in sorted(args.runs.glob("*.json"))]
    dense = {tuple(run["unit"].values()): run for run in runs if run["method"] == "dense"}
    by_seed: dict[tuple, dict[str, dict]] = {}
    for run in runs:
        unit = run["unit"]
        if unit["model"] == args.model and run["method"] in args.methods:
            by_seed.setdefault((unit["dataset"], run["density"], unit["seed"]), {})[run["method"]] = run
    print("| cell | seed | " + " | ".join(f"{m}: val, test" for m in args.methods) + " |")
    print("|---|---|" + "---|" * len(args.methods))
    for (dataset, density, seed), row in sorted(by_seed.items()):
        if len(row) == len(args.methods):
            cells = [", ".join(f"{row[m][s]['acc']:.3f} / {1e3 * row[m][s]['cwv']:.1f}" for s in ("val", "test"))
                     for m in args.methods]
            print(f"| {dataset} {args.model} {density} | {seed} | " + " | ".join(cells) + " |")
    for method in args.methods:
        mine = [run for run in runs if run["method"] == method]
        print(f"{method}: {len(mine)} seed-cells")
        for split in ("val", "test"):
            broken = sorted(f"{u['dataset']}/{u['model']} {run['density']} seed {u['seed']} "
                            f"({run[split]['acc']:.3f} vs dense {dense[tuple(u.values())][split]['acc']:.3f})"
                            for run in mine for u in [run["unit"]]
                            if run[split]["acc"] < dense[tuple(u.values())][split]["acc"] - MARGIN)
            print(f"  {split}: {len(broken)} breakdowns" + "".join(f"\n    {b}" for b in broken))


if __name__ == "__main__":
    main()
