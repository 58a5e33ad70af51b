"""Dense, random, magnitude, LTH and Ballot (plus Ballot ablations) at one density, over several seeds.

Writes ``<out>/compare.md`` (mean +- std table), ``compare.json`` (every run), ``acc_vs_cwv.png`` and
``per_class.png``, and prints Ballot's relative CWV / MCD improvement over each baseline and its
wall-time ratio to LTH. All choices of the method's defaults were made on validation metrics; this
script reports test metrics.

    python benchmarks/compare_methods.py --seeds 0 1 2 --out reports
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from variants import BASELINES, METRICS, VARIANTS  # noqa: E402

from ballot.config import apply_overrides, experiment_from_params, load_yaml  # noqa: E402
from ballot.errors import ConfigError  # noqa: E402
from ballot.experiment import model_metrics, prepare_data, run_prune, timed, train_dense  # noqa: E402
from ballot.storage import atomic_write, file_in_the_way, write_json, write_text  # noqa: E402


def run(params: dict[str, Any], seeds: list[int], variants: list[str]) -> list[dict[str, Any]]:
    """Every (seed, method) run's test metrics, per-class accuracy and wall times."""
    rows = []
    for seed in seeds:
        cfg = experiment_from_params(apply_overrides(params, [f"base.seed={seed}"]))
        data = prepare_data(cfg)
        (model, dense, _), dense_s = timed(train_dense, cfg, data)
        rows.append(_row("dense", seed, model_metrics(model, data, cfg.base.device), dense_s, 0.0))
        _report(rows[-1])
        for name in variants:
            variant_cfg = experiment_from_params(apply_overrides(params, [f"base.seed={seed}"] + VARIANTS[name]))
            result, prune_s = timed(run_prune, variant_cfg, data, dense)
            row = _row(name, seed, model_metrics(result.model, data, cfg.base.device), dense_s, prune_s)
            row["density"], row["final_choice"] = result.mask.density(), result.final_choice  # the kept rival
            rows.append(row)
            _report(row)
    return rows


def _row(method: str, seed: int, metrics: dict[str, Any], dense_s: float, prune_s: float) -> dict[str, Any]:
    return {"method": method, "seed": seed, **{k: metrics[k] for k in METRICS}, "per_class": metrics["per_class"],
            "val_acc": metrics["val"]["acc"], "val_cwv": metrics["val"]["cwv"], "prune_seconds": prune_s,
            "total_seconds": dense_s + prune_s, "class_names": metrics["class_names"]}


def _report(row: dict[str, Any]) -> None:
    print(f"seed {row['seed']} {row['method']:<34} acc {row['acc']:.4f} cwv {row['cwv']:.5f} mcd {row['mcd']:.4f} "
          f"worst {row['worst_class']:.4f} ({row['total_seconds']:.1f}s)", file=sys.stderr, flush=True)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> metric -> (mean, std over seeds)."""
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        summary[method] = {}
        for key in METRICS + ("prune_seconds", "total_seconds"):
            values = [r[key] for r in group]
            summary[method][key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return summary


def improvements(summary: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """Lines stating Ballot's relative CWV / MCD change and accuracy change against each baseline."""
    ours = summary["ballot"]
    lines = []
    for base in BASELINES:
        if base not in summary:
            continue
        theirs = summary[base]
        cwv = relative_change(ours["cwv"][0], theirs["cwv"][0])
        mcd = relative_change(ours["mcd"][0], theirs["mcd"][0])
        acc = 100 * (ours["acc"][0] - theirs["acc"][0])
        time_ratio = ours["total_seconds"][0] / theirs["total_seconds"][0]
        lines.append(f"- vs {base}: CWV {cwv}, MCD {mcd} (negative = fairer), accuracy {acc:+.2f} points, "
                     f"wall time (dense + prune) {time_ratio:.2f}x")
    return lines


def relative_change(ours: float, theirs: float) -> str:
    """``ours`` against ``theirs`` in per cent; a baseline at exactly 0 (every class equally accurate) has none."""
    if theirs == 0:
        return "level (both 0)" if ours == 0 else f"{ours:.5f} against 0"
    return f"{100 * (ours / theirs - 1):+.1f}%"


def cost_lines(summary: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """Each method's pruning wall time (dense phase excluded) as a ratio of LTH's."""
    if "lth" not in summary:
        return []
    lth = summary["lth"]["prune_seconds"][0]
    return [f"- {method}: {stats['prune_seconds'][0] / lth:.2f}x" for method, stats in summary.items()
            if method not in ("dense", "lth")]


def markdown(summary: dict[str, dict[str, tuple[float, float]]], header: str) -> str:
    lines = [header, "", "| method | acc | CWV | MCD | worst-class acc | prune time (s) | dense + prune (s) |",
             "|---|---|---|---|---|---|---|"]
    for method, stats in summary.items():
        cells = [f"{stats[k][0]:.4f} ± {stats[k][1]:.4f}" for k in ("acc",)]
        cells += [f"{stats['cwv'][0]:.5f} ± {stats['cwv'][1]:.5f}"]
        cells += [f"{stats[k][0]:.4f} ± {stats[k][1]:.4f}" for k in ("mcd", "worst_class")]
        cells += [f"{stats[k][0]:.1f} ± {stats[k][1]:.1f}" for k in ("prune_seconds", "total_seconds")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "ballot" in summary:
        lines += ["", "Ballot relative to each baseline (means over seeds):", ""]
        lines += improvements(summary)
    if cost_lines(summary):
        lines += ["", "Pruning wall time relative to LTH's (the shared dense phase excluded):", ""] + cost_lines(summary)
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """Accuracy vs CWV scatter (one point per method and seed) and per-class bars for dense, LTH and Ballot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: more methods than the default cycle's 10
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, method in enumerate(methods):
        group = [r for r in rows if r["method"] == method]
        ax.scatter([r["cwv"] for r in group], [r["acc"] for r in group], label=method, color=colors[i % len(colors)],
                   marker="o" if "ballot" not in method else "*", s=60 if "ballot" not in method else 140)
    ax.set_xlabel("CWV (class-wise variance, lower is fairer)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs fairness, one point per method and seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out / "acc_vs_cwv.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)

    shown = [m for m in ("dense", "lth", "ballot") if m in methods]
    names = rows[0]["class_names"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(shown)
    for i, method in enumerate(shown):
        group = [r["per_class"] for r in rows if r["method"] == method]
        means = [statistics.fmean(values) for values in zip(*group)]
        ax.bar([c + i * width for c in range(len(names))], means, width, label=method)
    ax.set_xticks([c + width * (len(shown) - 1) / 2 for c in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy of the class (mean over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(ncol=len(shown), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    atomic_write(out / "per_class.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", help="params.yaml to start from (default: built-in defaults)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="METHOD",
                        help=f"variants to run (default all): {list(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE",
                        help="parameter override, e.g. --set data.imbalance_ratio=10")
    parser.add_argument("--out", default="reports", help="folder for compare.md/json and plots")
    args = parser.parse_args(argv)

    params = load_yaml(args.params) if args.params else {}
    params = {k: v for k, v in params.items() if k in ("base", "data", "train_dense", "prune")}
    # a seed or method given twice is one run, not two
    args.seeds, args.methods = list(dict.fromkeys(args.seeds)), list(dict.fromkeys(args.methods))
    try:  # every run's settings, before any work
        params = apply_overrides(params, args.set)
        cfg = experiment_from_params(params)
        for seed in args.seeds:
            for overrides in [[], *(VARIANTS[name] for name in args.methods)]:
                experiment_from_params(apply_overrides(params, [f"base.seed={seed}", *overrides]))
    except ConfigError as error:
        parser.error(str(error))
    out = Path(args.out)
    blocked = file_in_the_way(out)
    if blocked:
        parser.error(f"--out {out}: {blocked} is a file, not a folder")
    started = time.perf_counter()
    rows = run(params, args.seeds, args.methods)
    summary = summarise(rows)
    header = (f"# Method comparison: {cfg.base.dataset}, {cfg.base.model}, density {cfg.base.density}, "
              f"imbalance ratio {cfg.data.imbalance_ratio:g}, seeds {args.seeds}\n\n"
              f"Test split; CWV unscaled (accuracies are fractions). Total {time.perf_counter() - started:.0f} s.")
    table = markdown(summary, header)
    write_text(out / "compare.md", table)
    write_json(out / "compare.json", {"rows": rows, "overrides": args.set})
    plot(rows, out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
