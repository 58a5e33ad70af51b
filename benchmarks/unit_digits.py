"""Structured pruning on digits with the CLI's defaults: one `ballot prune` per (model, method, seed), half the units.

Resumable: ``<out>/runs.json`` holds one record per finished run and is rewritten (atomically) after each, a run
already there is skipped, and a run folder under ``--work`` that already holds metrics.json is read, not retrained
(its record takes ``--threads`` as the count it ran with). The dense states of a (model, seed) are shared by its
methods. Each record carries the torch thread count it ran with (``OMP_NUM_THREADS``): on data this small another
count gives other numbers (docs/decisions.md).

    python benchmarks/unit_digits.py --models cnn resnet20 --seeds 0 1 2 --threads 1
    python benchmarks/unit_digits.py --report-only      # re-render unit_digits.md from runs.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from variants import METRICS  # noqa: E402

from ballot.storage import write_json, write_text  # noqa: E402

DENSITY = 0.25  # half the units of each group (a unit's weights scale with its inputs and outputs)
METHODS: dict[str, tuple[str, list[str]]] = {  # name -> (run folder, `ballot prune` arguments)
    "magnitude (unit)": ("magnitude", ["--method", "magnitude"]),
    "magnitude (unit) + refined": ("magref", ["--method", "magnitude", "--set", "prune.final_train=refined"]),
    "ballot (unit)": ("ballot", ["--method", "ballot"]),
}


def command(model: str, method: str, seed: int, work: Path) -> list[str]:
    folder, extra = METHODS[method]
    return ["ballot", "prune", "--dataset", "digits", "--model", model, "--granularity", "unit", "--density",
            str(DENSITY), *extra, "--seed", str(seed), "--out", str(work / model / folder / f"s{seed}"),
            "--dense", str(work / model / "dense" / f"s{seed}")]


def record(metrics: dict[str, Any], model: str, method: str, seed: int, threads: int) -> dict[str, Any]:
    return {"model": model, "method": method, "seed": seed, "threads": threads, "density": metrics["density"],
            "test": {k: metrics[k] for k in (*METRICS, "per_class")},
            "val": {k: metrics["val"][k] for k in METRICS}, "dense_test": {k: metrics["dense"][k] for k in METRICS}}


def run(model: str, method: str, seed: int, work: Path, threads: int) -> dict[str, Any]:
    args = command(model, method, seed, work)
    metrics_file = Path(args[args.index("--out") + 1]) / "metrics.json"
    if not metrics_file.is_file():
        executable = str(Path(sys.executable).with_name("ballot"))
        subprocess.run([executable, *args[1:]], check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return record(json.loads(metrics_file.read_text()), model, method, seed, threads)


def _stats(values: list[float], digits: int = 4) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    example = " ".join(command("MODEL", "ballot (unit)", 0, Path("WORK"))).replace("ballot/s0", "METHOD/sS")
    example = example.replace("--method ballot", "--method METHOD").replace("s0", "sS").replace("--seed 0", "--seed S")
    lines = ["# Structured pruning on digits (8x8), half the units, CLI defaults (test split)", "",
             f"Each run: `{example}` (METHOD `magnitude` or `ballot`; `magnitude (unit) + refined` is `magnitude` "
             "with `--set prune.final_train=refined`), the runs of a seed sharing its dense states; re-run or extend "
             "with `python benchmarks/unit_digits.py`. Per seed: test acc / CWV x 1e4 (torch threads of the run, "
             "docs/decisions.md). Records: `runs.json`.",
             "", "| model | method | seeds | dense acc | acc (mean ± std) | CWV x 1e4 (mean ± std) | worst-class acc | "
             "per seed acc / CWV x 1e4 (threads) |", "|---|---|---|---|---|---|---|---|"]
    for model in sorted({r["model"] for r in rows}):
        for method in METHODS:
            cell = sorted((r for r in rows if r["model"] == model and r["method"] == method), key=lambda r: r["seed"])
            if not cell:
                continue
            seeds = ", ".join(f"s{r['seed']} {r['test']['acc']:.3f}/{r['test']['cwv'] * 1e4:.1f} ({r['threads']})"
                              for r in cell)
            dense = statistics.mean(r["dense_test"]["acc"] for r in cell)
            worst = statistics.mean(r["test"]["worst_class"] for r in cell)
            acc, cwv = _stats([r["test"]["acc"] for r in cell]), _stats([r["test"]["cwv"] * 1e4 for r in cell], 2)
            lines.append(f"| {model} | {method} | {len(cell)} | {dense:.4f} | {acc} | {cwv} | {worst:.4f} | {seeds} |")
    lines += ["", "Paired over the seeds both ran (CWV x 1e4, ballot (unit) minus the other; SE = std / sqrt(n)):", ""]
    for model in sorted({r["model"] for r in rows}):
        for other in ("magnitude (unit)", "magnitude (unit) + refined"):
            lines.append(f"- {model}, against {other}: {paired(rows, model, other)}")
    return "\n".join(lines) + "\n"


def paired(rows: list[dict[str, Any]], model: str, other: str) -> str:
    cwv = {(r["method"], r["seed"]): r["test"]["cwv"] * 1e4 for r in rows if r["model"] == model}
    gaps = [cwv["ballot (unit)", s] - cwv[other, s] for m, s in cwv if m == "ballot (unit)" and (other, s) in cwv]
    if len(gaps) < 2:
        return "fewer than two paired seeds"
    error = statistics.stdev(gaps) / len(gaps) ** 0.5
    return (f"{statistics.mean(gaps):+.2f} ± {error:.2f} (SE), ballot lower at {sum(g < 0 for g in gaps)}, level at "
            f"{sum(g == 0 for g in gaps)}, higher at {sum(g > 0 for g in gaps)} of {len(gaps)} seeds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet20"], choices=["mlp", "cnn", "resnet20", "vgg"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (OMP_NUM_THREADS)")
    parser.add_argument("--work", default="runs/unit_digits", help="folder of the run folders and dense states")
    parser.add_argument("--out", default="reports/unit_digits", help="folder of runs.json and unit_digits.md")
    parser.add_argument("--report-only", action="store_true", help="render the table from runs.json only")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    store = out / "runs.json"
    rows: list[dict[str, Any]] = json.loads(store.read_text()) if store.is_file() else []
    done = {(r["model"], r["method"], r["seed"]) for r in rows}
    if not args.report_only:
        for model in args.models:
            for seed in args.seeds:
                for method in args.methods:
                    if (model, method, seed) in done:
                        continue
                    rows.append(run(model, method, seed, work, args.threads))
                    write_json(store, rows)
                    test = rows[-1]["test"]
                    print(f"digits/{model} seed {seed} {method:<28} test acc {test['acc']:.4f} cwv {test['cwv']:.5f}")
    write_text(out / "unit_digits.md", markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
