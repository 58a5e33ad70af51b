"""Deployment cost of sparsity: file size, ONNX Runtime speed and fairness of dense, sparse and structured exports.

For each model (default ``mlp``, ``cnn``, ``resnet20``), trained briefly on scikit-learn's digits (offline, 8x8;
``--dataset fashion-mnist --max-train N`` for 28x28 inputs on a capped training set):

- ``dense``: the trained model, plain dense export;
- ``sparse``: a 5% magnitude mask with Erdos-Renyi-Kernel layer budgets (a global one kills the small digits
  models), fine-tuned under the mask, compact export (dead units removed, sparse
  weights packed);
- ``structured`` (``--structured``, on by default): half the units of every prunable layer but the classifier
  removed by L1 norm, residual-coupled channels together (prune.granularity 'unit' magnitude; their biases and
  BatchNorm pinned at zero, so they are exactly dead), fine-tuned under that mask, compact export (dead-unit
  removal shrinks the layers);
- ``int8``: the dense model quantized (onnxruntime.quantization; static QOperator by default, ``--int8 dynamic``),
  with its measured accuracy change;
- ``sparse-int8`` and ``structured-int8``: the sparse and structured models quantized the same way, compact
  export (INT8 weights packed, removed units gone).

Columns: file bytes and their ratios to the dense file, to the same model's float file (INT8 rows: ``int8`` to
``dense``, ``sparse-int8`` to ``sparse``, ``structured-int8`` to ``structured``) and to the lossless floor, session
creation time, ORT latency
p50 / p99 and throughput at batch 1 and 64 with 1 and 2 intra-op threads (and ratios to dense), whether ONNX
Runtime folded the packed subgraph away, and test accuracy / CWV measured on the exported file. Timings of one
model's rows are interleaved (five rounds) so that background load falls on all of them alike. Writes
``deploy_bench.{json,md,png}`` to ``--out``. The default run takes a few minutes on 2 cores.

    .venv/bin/python benchmarks/deploy_bench.py [--models mlp cnn resnet20] [--seconds 1] [--no-structured]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ballot.config import DataConfig, TrainConfig
from ballot.data import DataBundle, load_data
from ballot.export import bake, export_checked
from ballot.masks import Mask, erk_counts, magnitude_scores, prunable_names
from ballot.models import build_model
from ballot.pruning.units import select_units, unit_groups, unit_mask, unit_scores
from ballot.quantize import QuantizationGate, calibration_index, onnx_class_metrics
from ballot.storage import atomic_write, write_json, write_text
from ballot.train import train

BATCHES, THREADS = (1, 64), (1, 2)
FLOAT_ROW = {"int8": "dense", "sparse-int8": "sparse", "structured-int8": "structured"}  # INT8 row: its float row
PACK_OPS = {"BitShift", "BitwiseAnd", "CumSum", "Gather", "Where", "ScatterElements", "ConstantOfShape", "Split"}


def structured_mask(model: nn.Module, input_shape: tuple[int, ...], keep: float = 0.5) -> Mask:
    """Half (``keep``) of the units of every coupled group kept by L1 norm (prune.granularity 'unit' magnitude:
    ballot.pruning.units), the others exactly dead."""
    groups = unit_groups(model, input_shape)
    counts = {g.name: max(1, round(keep * g.size)) for g in groups}
    return unit_mask(model, groups, select_units(unit_scores(model, groups), counts))


def latencies(paths: list[Path], shape: tuple[int, ...], batch: int, threads: int, seconds: float,
              rounds: int = 5) -> list[dict[str, float]]:
    """p50 / p99 latency (ms) and throughput (samples/s) of ONNX Runtime on random inputs for each file, about
    ``seconds`` each, taken in ``rounds`` turns across the files so that background load hits them alike."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in paths]
    feed = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for session, spent in zip(sessions, times):
            inputs = {session.get_inputs()[0].name: feed}
            for _ in range(3):
                session.run(None, inputs)
            deadline = time.perf_counter() + seconds / rounds
            while time.perf_counter() < deadline or len(spent) < 4:
                start = time.perf_counter()
                session.run(None, inputs)
                spent.append(time.perf_counter() - start)
    results = []
    for spent in times:
        ms = np.array(spent) * 1e3
        results.append({"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                        "throughput": float(batch * len(ms) / (ms.sum() / 1e3))})
    return results


def load_profile(path: Path) -> dict[str, Any]:
    """Session creation time and whether the optimized graph still holds any op of the packed subgraph."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        start = time.perf_counter()
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        load_ms = (time.perf_counter() - start) * 1e3
        ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    return {"load_ms": load_ms, "folded": not ops & PACK_OPS}


def trained(name: str, data: DataBundle, epochs: int, seed: int) -> nn.Module:
    """Model ``name`` on ``data``, trained with Adam for ``epochs``."""
    torch.manual_seed(seed)
    model = build_model(name, data.input_shape, data.num_classes, *data.input_stats())
    train(model, data.train, _train_cfg(epochs), seed=seed, progress=False)
    return model.eval()


def _train_cfg(epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine")


def rows_for(name: str, data: DataBundle, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """Every row of one model: export, then size, speed and fairness of the exported file."""
    dense = trained(name, data, args.epochs, args.seed)
    variants: list[tuple[str, nn.Module, Mask | None, dict[str, Any]]] = [("dense", dense, None, {"compact": False})]
    sparse = copy.deepcopy(dense)
    scores = magnitude_scores(sparse, prunable_names(sparse))
    mask = Mask.top_k_per_layer(scores, erk_counts({n: s.shape for n, s in scores.items()}, args.density))
    train(sparse, data.train, _train_cfg(args.finetune_epochs), seed=args.seed, mask=mask, progress=False)
    variants.append(("sparse", sparse, mask, {}))
    if args.structured:
        unit = copy.deepcopy(dense)
        halved = structured_mask(unit, data.input_shape)
        train(unit, data.train, _train_cfg(args.finetune_epochs), seed=args.seed, mask=halved, progress=False)
        variants.append(("structured", unit, halved, {}))
    calibration = data.train.x[calibration_index(data.train.y, 256, data.num_classes, args.seed)]
    gate = QuantizationGate(args.int8, 1.0, 1.0, data.test.x.numpy(), data.test.y.numpy(), data.num_classes,
                            calibration.numpy())
    variants.append(("int8", dense, None, {"compact": False, "quantization": gate}))
    variants.append(("sparse-int8", sparse, mask, {"quantization": gate}))
    if args.structured:
        variants.append(("structured-int8", unit, halved, {"quantization": gate}))
    rows, paths = [], []
    for kind, model, mask, options in variants:
        paths.append(folder / f"{name}-{kind}.onnx")
        report = export_checked(bake(model, mask), data.input_shape, paths[-1], {}, data.test.x[:256], 1e-4, **options)
        rows.append({"model": name, "row": kind, "bytes": paths[-1].stat().st_size,
                     "floor": report["lossless_floor_bytes"], "removed_units": sum(report["removed_units"].values()),
                     "packed": len(report["packed_tensors"]),
                     **onnx_class_metrics(paths[-1], data.test.x.numpy(), data.test.y.numpy(), data.num_classes),
                     **load_profile(paths[-1])})
        row, ratio = rows[-1], ""
        if kind in FLOAT_ROW:
            row["float_ratio"] = row["bytes"] / next(r["bytes"] for r in rows if r["row"] == FLOAT_ROW[kind])
            ratio = f" ({row['float_ratio']:.3f}x {FLOAT_ROW[kind]})"
        print(f"  {name} {kind}: {row['bytes']} bytes{ratio}  acc {row['acc']:.4f}  cwv {row['cwv']:.5f}", flush=True)
    for batch in BATCHES:
        for threads in THREADS:
            for row, timing in zip(rows, latencies(paths, data.input_shape, batch, threads, args.seconds)):
                row[f"b{batch}t{threads}"] = timing
    base = rows[0]
    for row in rows:
        row["dense_ratio"] = row["bytes"] / base["bytes"]
        row["floor_ratio"] = row["bytes"] / row["floor"]
        for key in (f"b{b}t{t}" for b in BATCHES for t in THREADS):
            row[key]["speedup"] = row[key]["throughput"] / base[key]["throughput"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of ``rows``."""
    speed = [f"b{b}t{t}" for b in BATCHES for t in THREADS]
    head = (["model", "row", "bytes", "x dense", "x float", "x floor", "units removed", "load ms", "folded"]
            + [f"b{k[1:].replace('t', ' t')} p50/p99 ms (samples/s, x dense)" for k in speed] + ["acc", "CWV"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["row"], f"{r['bytes']:,}", f"{r['dense_ratio']:.3f}",
                 f"{r['float_ratio']:.3f}" if "float_ratio" in r else "-", f"{r['floor_ratio']:.2f}",
                 str(r["removed_units"]), f"{r['load_ms']:.0f}", "yes" if r["folded"] else "no"]
        cells += [f"{r[k]['p50_ms']:.3f}/{r[k]['p99_ms']:.3f} ({r[k]['throughput']:,.0f}, {r[k]['speedup']:.2f})"
                  for k in speed]
        cells += [f"{r['acc']:.4f}", f"{r['cwv']:.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """File size (x dense) and batch-64 / 2-thread throughput (x dense) per model and row, with accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    kinds = list(dict.fromkeys(r["row"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        chosen = {r["model"]: r for r in rows if r["row"] == kind}
        xs = [m + k * width for m in range(len(models)) if models[m] in chosen]
        picked = [chosen[m] for m in models if m in chosen]
        axes[0].bar(xs, [r["dense_ratio"] for r in picked], width, label=kind)
        bars = axes[1].bar(xs, [r["b64t2"]["speedup"] for r in picked], width, label=kind)
        for bar, r in zip(bars, picked):
            axes[1].annotate(f"{r['acc']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                             ha="center", va="bottom", fontsize=7)
    for ax, title in zip(axes, ("file size / dense file", "throughput / dense (batch 64, 2 threads; labels: acc)")):
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(models))], models)
        ax.set_title(title, fontsize=10)
        ax.axhline(1.0, color="grey", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet20"])
    parser.add_argument("--density", type=float, default=0.05, help="density of the sparse row")
    parser.add_argument("--epochs", type=int, default=10, help="dense training epochs on digits")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="epochs under the sparse / structured mask")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per (row, batch, threads)")
    parser.add_argument("--structured", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--int8", choices=["dynamic", "static"], default="static",
                        help="quantization of the int8 rows (static: QOperator, calibrated on 256 training inputs)")
    parser.add_argument("--dataset", choices=["digits", "fashion-mnist"], default="digits")
    parser.add_argument("--max-train", type=int, help="cap on the training pool (data.max_train_samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("reports/deploy"))
    args = parser.parse_args()
    torch.set_num_threads(max(THREADS))
    data = load_data(args.dataset, DataConfig(max_train_samples=args.max_train), seed=args.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows += rows_for(name, data, args, Path(folder))
    markdown = table(rows)
    print(markdown)
    write_json(args.out / "deploy_bench.json", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    write_text(args.out / "deploy_bench.md", markdown)
    plot(rows, args.out / "deploy_bench.png")
    print(f"wrote {args.out}/deploy_bench.{{json,md,png}}")


if __name__ == "__main__":
    main()
