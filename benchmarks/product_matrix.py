"""The method matrix judged on the product's Ballot, merged from the matrix and the reports that ran cells again.

`reports/matrix` was recorded with ERK budgets; Ballot with the product's budgets (``ballot (blend)``, the product's
Ballot until the refined training chose its start per run: ``ballot (blend) best``) ran afterwards where the
cached dense states still matched, and in reports of their own (one `benchmarks/matrix.py --out` each) where they did
not. This script puts them together. A cell (dataset, model, density) is taken whole from the **last** folder in
which the judged method ran on it together with LTH, and only on the seeds where both ran, so the comparisons in a
cell are paired on the same dense states; no cell mixes two folders. Writes ``<out>/matrix.md`` (``matrix_val.md``
with ``--split val``: which folder each cell came from, the acceptance figures, the summary and the per-cell rows)
and ``<out>/cwv_gain.png`` (``cwv_gain_val.png``).

    python benchmarks/product_matrix.py reports/matrix reports/matrix_fmnist_lt_cnn reports/matrix_fmnist_cnn_d005 \\
        reports/matrix_fmnist_cnn_d002 reports/matrix_r20_d002 reports/matrix_r20 reports/matrix_digits_cnn
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matrix import cell_name, cell_of, heatmap, markdown, ordered_cells, summarise  # noqa: E402

from ballot.storage import write_text  # noqa: E402

Cell = tuple[str, str, float]


def load_rows(folder: Path) -> list[dict[str, Any]]:
    """The finished records a matrix run collected in ``folder/matrix.json``."""
    path = folder / "matrix.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass folders written by benchmarks/matrix.py --out")
    return json.loads(path.read_text())["rows"]


def merge(folders: list[tuple[str, list[dict[str, Any]]]], judged: str) -> tuple[list[dict[str, Any]], dict[Cell, str]]:
    """The rows of every cell from the last folder in which ``judged`` and LTH ran on it, restricted to the seeds both
    ran on; and the folder of each cell."""
    chosen: dict[Cell, tuple[str, list[dict[str, Any]]]] = {}
    for name, rows in folders:
        seeds: dict[tuple[Cell, str], set[int]] = {}
        for row in rows:
            seeds.setdefault((cell_of(row), row["method"]), set()).add(row["unit"]["seed"])
        for (cell, method), judged_seeds in seeds.items():
            paired = judged_seeds & seeds.get((cell, "lth"), set()) if method == judged else set()
            if paired:
                chosen[cell] = name, [r for r in rows if cell_of(r) == cell and r["unit"]["seed"] in paired]
    merged = [row for _, rows in chosen.values() for row in rows]
    return merged, {cell: name for cell, (name, _) in chosen.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="benchmarks/matrix.py --out folders, later ones taking precedence")
    parser.add_argument("--judged", default="ballot (blend)", help="the method the acceptance figures judge")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "lth", "lth + refined"],
                        help="the other methods shown in the summary")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--out", default="reports/product_matrix")
    args = parser.parse_args(argv)

    rows, origins = merge([(folder, load_rows(Path(folder))) for folder in args.folders], args.judged)
    if not rows:
        raise SystemExit(f"no folder has a run of {args.judged!r} beside one of lth")
    table = summarise(rows, args.split)
    by_folder: dict[str, list[str]] = {}
    for cell in ordered_cells(origins):
        by_folder.setdefault(origins[cell], []).append(cell_name(cell))
    origin = "; ".join(f"{folder}: {', '.join(cells)}" for folder, cells in by_folder.items())
    notes = (f"The acceptance figures judge `{args.judged}`. Each cell comes whole from one folder, on the seeds where "
             f"`{args.judged}` and lth both ran there (`benchmarks/product_matrix.py`): {origin}.")
    out = Path(args.out)
    suffix = "" if args.split == "test" else "_val"
    methods = [m for m in args.methods if m != args.judged] + [args.judged]
    write_text(out / f"matrix{suffix}.md", markdown(table, args.split, methods, notes, args.judged, rows))
    heatmap(table, out / f"cwv_gain{suffix}.png", args.split, args.judged)
    print((out / f"matrix{suffix}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
