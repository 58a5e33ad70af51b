"""Stage evaluate: the sparse model (masks baked) on the test split -> metrics.json and per-class plot data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ballot.config import ExperimentConfig
from ballot.experiment import load_pruned, model_metrics
from ballot.export import bake
from ballot.snapshot import load_snapshot
from ballot.storage import atomic_write, staged_folder, write_json
from pipelines.common import DATA, DENSE, METRICS, PLOTS, PRUNE, read_json, run_stage

GAPS = ("acc", "cwv", "mcd", "worst_class")
GROUP_GAPS = ("group_var", "group_gap", "worst_group")  # present when the data has a sensitive attribute


def _gaps(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in (*GAPS, *GROUP_GAPS) if key in metrics}


def summarise(sparse: dict[str, Any], dense: dict[str, Any], kept: int, total: int) -> dict[str, Any]:
    """metrics.json: the sparse model's test metrics, per-class accuracy by name (and, with a sensitive attribute,
    per-group accuracy and its gaps), density, dense and val references."""
    names = sparse["class_names"]
    groups = {"per_group": sparse["per_group"]} if "per_group" in sparse else {}
    return {
        **_gaps(sparse),
        **groups,
        "worst_class_name": names[sparse["worst_class_index"]],
        "density": kept / total,
        "kept_weights": kept,
        "total_weights": total,
        "per_class": dict(zip(names, sparse["per_class"])),
        "dense": _gaps(dense),
        "val": _gaps(sparse["val"]),
    }


def per_class_rows(sparse: dict[str, Any], dense: dict[str, Any], counts: list[int]) -> list[dict[str, Any]]:
    """One plot row per class: sparse and dense test accuracy and the class's test-sample count."""
    return [{"class": name, "sparse": s, "dense": d, "test_samples": n}
            for name, s, d, n in zip(sparse["class_names"], sparse["per_class"], dense["per_class"], counts)]


def draw(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Horizontal bars of dense vs sparse accuracy per class, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    positions = range(len(rows))
    ax.barh([p + 0.2 for p in positions], [r["dense"] or 0 for r in rows], height=0.4, label="dense")
    ax.barh([p - 0.2 for p in positions], [r["sparse"] or 0 for r in rows], height=0.4, label="sparse")
    ax.set_yticks(list(positions), [r["class"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main(cfg: ExperimentConfig) -> None:
    data = load_snapshot(DATA)
    model, mask = load_pruned(PRUNE, cfg, data)
    sparse = model_metrics(bake(model, mask), data, cfg.base.device)
    dense = read_json(DENSE / "metrics.json")
    metrics = summarise(sparse, dense, mask.kept, mask.total)
    rows = per_class_rows(sparse, dense, read_json(DATA / "summary.json")["class_counts"]["test"])
    with staged_folder(PLOTS) as folder:
        write_json(folder / "per_class.json", rows)
        if cfg.evaluate.plot_image:
            title = f"{cfg.prune.method} at density {metrics['density']:.3f}: acc {metrics['acc']:.3f}, cwv {metrics['cwv']:.4f}"
            draw(rows, title, folder / "per_class.png")
    write_json(METRICS, metrics)
    print(f"evaluate: acc {metrics['acc']:.4f} (dense {dense['acc']:.4f})  cwv {metrics['cwv']:.5f}  "
          f"mcd {metrics['mcd']:.4f}  worst {metrics['worst_class_name']} {metrics['worst_class']:.4f}  "
          f"density {metrics['density']:.4f} -> {METRICS}, {PLOTS}/")


if __name__ == "__main__":
    run_stage("evaluate", main)
