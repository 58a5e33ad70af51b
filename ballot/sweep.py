"""The density sweep: every method at every density on one dense model -> points, per-method curves, a figure."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from ballot.config import ExperimentConfig
from ballot.data import DataBundle
from ballot.experiment import model_metrics, run_prune, timed
from ballot.pruning import DenseArtifacts
from ballot.storage import atomic_write

CURVE_METRICS = ("acc", "cwv", "mcd", "worst_class")


def run_sweep(cfg: ExperimentConfig, data: DataBundle, dense: DenseArtifacts,
              configure: Callable[[ExperimentConfig], ExperimentConfig] = lambda c: c,
              progress: bool | None = None) -> list[dict[str, Any]]:
    """One point per (method, density) of ``cfg.sweep``; ``configure`` adjusts each run's configuration (the
    pipeline applies the tuned Ballot values with it). A point holds test metrics, validation accuracy and seconds."""
    runs = [(m, d) for m in cfg.sweep.methods for d in sorted(cfg.sweep.densities, reverse=True)]
    points = []
    for method, density in tqdm(runs, desc="sweep", unit="run", disable=(not progress) if progress is not None else None):
        run_cfg = configure(dataclasses.replace(
            cfg, base=dataclasses.replace(cfg.base, density=density),
            prune=cfg.prune.for_method(method)))
        result, seconds = timed(run_prune, run_cfg, data, dense, progress=False)
        metrics = model_metrics(result.model, data, cfg.base.device)
        points.append({"method": method, "density": result.mask.density(), "target_density": density,
                       **{k: metrics[k] for k in CURVE_METRICS}, "val_acc": metrics["val"]["acc"],
                       "seconds": seconds})
    return points


# the DVC linear plots: folder -> the columns of its one-file-per-method curves (dvc.yaml plots the folders)
PLOT_COLUMNS = {"accuracy": ("acc", "worst_class"), "cwv": ("cwv",)}


def curves(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """method -> its points ordered by density."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        by_method.setdefault(point["method"], []).append(point)
    return {m: sorted(rows, key=lambda r: r["density"]) for m, rows in by_method.items()}


def plot_rows(points: list[dict[str, Any]], methods: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """'<folder>/<method>.json' -> rows of density and the folder's columns (see PLOT_COLUMNS), for every method of
    ``points`` and of ``methods`` (a method without points gets an empty file, so a plot tool finds it)."""
    by_method = {method: [] for method in methods} | curves(points)
    return {f"{folder}/{method}.json": [{"density": r["density"], **{c: r[c] for c in columns}} for r in rows]
            for folder, columns in PLOT_COLUMNS.items() for method, rows in by_method.items()}


def plot_curves(points: list[dict[str, Any]], dense: dict[str, Any], path: str | Path) -> Path:
    """Accuracy and CWV against density (log scale), one line per method, the dense model as a dashed line; without
    points, a figure that says the sweep is off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if points:
        fig = _curves_figure(plt, points, dense)
    else:
        fig = plt.figure(figsize=(10, 3.8))
        fig.text(0.5, 0.5, "The density sweep is off: set sweep.densities to draw accuracy and CWV against density.",
                 ha="center", va="center")
    written = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return written


def _curves_figure(plt: Any, points: list[dict[str, Any]], dense: dict[str, Any]) -> Any:
    """The two panels of ``plot_curves`` (``plt``: matplotlib.pyplot, imported by the caller)."""
    from matplotlib.ticker import NullFormatter

    densities = sorted({round(r["density"], 4) for r in points})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(axes, ("acc", "cwv"), ("test accuracy", "class-wise variance (lower = fairer)")):
        for method, rows in curves(points).items():
            ax.plot([r["density"] for r in rows], [r[key] for r in rows], marker="o", label=method)
        ax.axhline(dense[key], color="grey", linestyle="--", linewidth=1, label="dense")
        ax.set_xscale("log")
        ax.set_xticks(densities, [f"{d:g}" for d in densities])  # the measured densities, not log-scale decades
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("density (fraction of weights kept)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Accuracy and fairness against density", fontsize=10)
    fig.tight_layout()
    return fig
