"""Paired comparison of two matrix methods, cell by cell: `paired.py RUNS_DIR METHOD_A METHOD_B [--split val|test]`.

Prints, per (dataset, model, density), both methods' mean accuracy and CWV over the seeds both finished, and the mean
paired difference (B - A) with its standard error; then the same over all seed pairs, and the cell averages: the mean
over cells of the cells' accuracy differences, and of their mean CWVs (each cell weighing the same, as the matrix's
acceptance figures do), and the mean of the cells' relative CWV changes."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return mean, se


def seed_records(folders: list[Path]) -> dict[tuple, dict[int, dict[str, dict]]]:
    """Every run record (``*.json``) in ``folders``, as {(dataset, model, density): {seed: {method: record}}};
    SystemExit when two different records share a method name in one seed-cell (runs of two configurations under one
    name: which one a comparison read would depend on the file names)."""
    records: dict[tuple, dict[int, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    seen: dict[tuple, Path] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            run = json.loads(path.read_text())
            unit = run["unit"]
            cell, seed, method = (unit["dataset"], unit["model"], run["density"]), unit["seed"], run["method"]
            earlier = records[cell][seed].get(method)
            if earlier is not None and earlier != run:
                raise SystemExit(f"{path} and {seen[(cell, seed, method)]} are two different '{method}' runs of "
                                 f"{'/'.join(map(str, cell))} seed {seed}: keep one configuration per method name "
                                 "in a folder (matrix.json's rows say which the matrix used)")
            records[cell][seed][method], seen[(cell, seed, method)] = run, path
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    args = parser.parse_args()
    by_cell = {cell: {seed: {m: run[args.split] for m, run in methods.items()} for seed, methods in seeds.items()}
               for cell, seeds in seed_records([args.runs]).items()}
    print(f"{args.split}: {args.a} (A) against {args.b} (B); acc in points, CWV x 1e3; B - A paired over seeds")
    print(f"{'cell':28} {'n':>2} {'A acc':>6} {'B acc':>6} {'d acc':>12} {'A cwv':>6} {'B cwv':>6} {'d cwv':>12}")
    all_acc, all_cwv, cells = [], [], []
    for cell in sorted(by_cell):
        pairs = [(s[args.a], s[args.b]) for s in by_cell[cell].values() if args.a in s and args.b in s]
        if not pairs:
            continue
        acc = [100 * (b["acc"] - a["acc"]) for a, b in pairs]
        cwv = [1e3 * (b["cwv"] - a["cwv"]) for a, b in pairs]
        all_acc += acc
        all_cwv += cwv
        (da, sa), (dc, sc) = _mean_se(acc), _mean_se(cwv)
        a_acc = statistics.fmean(100 * a["acc"] for a, _ in pairs)
        b_acc = statistics.fmean(100 * b["acc"] for _, b in pairs)
        a_cwv = statistics.fmean(1e3 * a["cwv"] for a, _ in pairs)
        b_cwv = statistics.fmean(1e3 * b["cwv"] for _, b in pairs)
        cells.append((da, a_cwv, b_cwv))
        name = "/".join(map(str, cell))
        print(f"{name:28} {len(pairs):>2} {a_acc:6.1f} {b_acc:6.1f} {da:+6.2f}±{sa:4.2f} {a_cwv:6.1f} {b_cwv:6.1f} "
              f"{dc:+6.2f}±{sc:4.2f}")
    if all_acc:
        (da, sa), (dc, sc) = _mean_se(all_acc), _mean_se(all_cwv)
        blank = ""
        print(f"{'all seed pairs':28} {len(all_acc):>2} {blank:13} {da:+6.2f}±{sa:4.2f} {blank:13} "
              f"{dc:+6.2f}±{sc:4.2f}")
        a_cwv, b_cwv = (statistics.fmean(c[i] for c in cells) for i in (1, 2))
        per_cell = statistics.fmean(b / a - 1 for _, a, b in cells if a > 0)
        print(f"cell averages over {len(cells)} cells: B - A accuracy {statistics.fmean(c[0] for c in cells):+.2f} "
              f"points; mean CWV {a_cwv:.2f} (A) against {b_cwv:.2f} (B) x 1e-3, {100 * (b_cwv / a_cwv - 1):+.1f}%; "
              f"mean of the per-cell relative CWV changes {100 * per_cell:+.1f}%")


if __name__ == "__main__":
    main()
