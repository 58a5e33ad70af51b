"""Stage sweep (opt-in: sweep.densities): accuracy and CWV against density, one curve per method -> sweep/."""

from __future__ import annotations

from ballot.config import ExperimentConfig
from ballot.experiment import load_dense
from ballot.snapshot import load_snapshot
from ballot.storage import staged_folder, write_json
from ballot.sweep import plot_curves, plot_rows, run_sweep
from ballot.tuning.space import apply_best
from pipelines.common import BEST_PARAMS, DATA, DENSE, SWEEP, read_json, run_stage


def main(cfg: ExperimentConfig) -> None:
    points = []
    if cfg.sweep.densities:
        points = run_sweep(cfg, load_snapshot(DATA), load_dense(DENSE), lambda c: apply_best(c, BEST_PARAMS)[0])
    with staged_folder(SWEEP) as folder:
        write_json(folder / "density_curve.json", {"points": points})
        # off, the plot files are empty and the figure says so: `dvc plots show` finds every plot it declares
        for name, rows in plot_rows(points, cfg.sweep.methods).items():
            write_json(folder / name, rows)
        plot_curves(points, read_json(DENSE / "metrics.json"), folder / "density_curve.png")
    if not points:
        print(f"sweep: off (sweep.densities is empty) -> {SWEEP}/")
        return
    for point in points:
        print(f"sweep: {point['method']:<12} density {point['density']:.4f}  acc {point['acc']:.4f}  "
              f"cwv {point['cwv']:.5f}  ({point['seconds']:.0f}s)")
    print(f"sweep: {len(points)} runs -> {SWEEP}/density_curve.png, {SWEEP}/accuracy/, {SWEEP}/cwv/")


if __name__ == "__main__":
    run_stage("sweep", main)
