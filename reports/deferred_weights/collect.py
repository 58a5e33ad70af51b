"""Copy the study's records into reports/deferred_weights/runs: from each working folder (a copy of the report folder
whose product runs the variant pairs with), the dense, LTH, LTH + refined (plain and DRW), product Ballot and DRW
Ballot records of the units the DRW Ballot ran on. `collect.py FOLDER...`"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

KEPT = ("lth", "lth + refined", "lth + refined drw", "ballot (blend)", "ballot (blend) drw")
OUT = Path(__file__).resolve().parent / "runs"


def unit_of(record: dict) -> tuple:
    return tuple(record["unit"][k] for k in ("dataset", "model", "seed"))


def main(folders: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    for folder in folders:
        paths = sorted((Path(folder) / "runs").glob("*.json"))
        records = {path: json.loads(path.read_text()) for path in paths}
        drw = {(unit_of(r), r["density"]) for r in records.values() if r["method"] == "ballot (blend) drw"}
        units = {unit for unit, _ in drw}
        for path, record in records.items():
            wanted = record["method"] == "dense" and unit_of(record) in units
            wanted |= record["method"] in KEPT and (unit_of(record), record["density"]) in drw
            if wanted:
                shutil.copy(path, OUT / path.name)


if __name__ == "__main__":
    main(sys.argv[1:])
