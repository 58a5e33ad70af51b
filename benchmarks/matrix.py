"""The method matrix: datasets x models x densities x seeds, every method; resumable, cells in parallel processes.

Every run is one JSON file under ``<out>/runs/`` named by a hash of its whole configuration, so a killed or
extended matrix skips what is done, and a variant whose configuration equals another's reuses it. Dense states are
cached under ``<cache>/dense/`` and shared by every density and method of a (dataset, model, seed); a unit whose
cached dense state is not the one its records in ``<out>`` were built on (another machine or thread count trained the
cache: the hash of its tensors differs, or for records older than the hash its dense test metrics) gets no new runs,
with a message, so no cell mixes two dense models. Each record holds validation *and* test metrics: defaults are
chosen on validation (``--split val``), the report is on test.

    python benchmarks/matrix.py --workers 2                       # the whole matrix -> reports/matrix.md, .json, .png
    python benchmarks/matrix.py --datasets digits --models cnn --seeds 0 --methods lth ballot --out runs/m
    python benchmarks/matrix.py --report-only --split val         # re-render from the finished runs
    python benchmarks/matrix.py --dataset "cancer:base.dataset=npz,data.path=runs/cancer.npz" --models mlp
                                                                  # your own data set, in place of the three

Caps (so the matrix fits a 2-core machine): see CAPS; every cell uses data.val_fraction 0.2. A data set given with
``--dataset`` gets no cap, no longer schedule and no data setting beyond its own (``data.max_train_samples`` caps it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from variants import METRICS, VARIANTS, parse_extra  # noqa: E402

from ballot.config import (FLOORED_SCHEDULES, ExperimentConfig, apply_overrides, experiment_from_params,  # noqa: E402
                           load_yaml, to_dict)
from ballot.errors import ConfigError  # noqa: E402
from ballot.processes import stop_children, terminate_with_parent  # noqa: E402
from ballot.storage import atomic_write, file_in_the_way, write_json, write_text  # noqa: E402

DATASETS: dict[str, list[str]] = {
    "fmnist-lt": ["base.dataset=fashion-mnist", "data.imbalance_ratio=10"],
    "fmnist": ["base.dataset=fashion-mnist", "data.imbalance_ratio=1"],
    "digits": ["base.dataset=digits", "data.imbalance_ratio=1"],
}
MODELS = ("mlp", "cnn", "resnet20")
# models a run may ask for but the default matrix leaves out: no default was chosen on them (held-out checks)
HELD_OUT_MODELS = ("vgg", "resnet18")
DENSITIES = (0.05, 0.02)
# Training-pool caps (samples drawn before the long tail and the validation split) where a full pass is too slow for
# 2 CPU cores. The long tail keeps about 39% of a capped pool: fmnist-lt/cnn trains on about 3,100 images.
CAPS: dict[tuple[str, str], int] = {
    ("fmnist-lt", "cnn"): 10000, ("fmnist-lt", "resnet20"): 6000,
    ("fmnist", "cnn"): 4000, ("fmnist", "resnet20"): 2500,
}
# prune.recalibrate_bn came after the recorded runs: pinned off here so they stay valid (it changes only models with
# BatchNorm, here resnet20 and vgg; docs/ballot.md says what it does on small data). So did Ballot's default budget
# rule 'blend': the recorded Ballot rows pin ERK, and the 'ballot (blend)' method has the product's budgets. And the
# schedules' min_steps floors: 0 here, the matrix states its schedules itself (LONGER). And the refined training's
# start: rewound to theta_k, as recorded; the 'best' methods (MATRIX_VARIANTS) take the product's per-run choice, so
# 'ballot (blend) best' is the product's Ballot.
UNFLOORED = [f"{schedule}.min_steps=0" for schedule in FLOORED_SCHEDULES]
COMMON = ["data.val_fraction=0.2", "prune.recalibrate_bn=false", "prune.ballot.layer_budget=erk",
          "prune.ballot.refine_start=rewind", *UNFLOORED]
# digits has 1,150 training images (9 steps an epoch): every schedule runs 3x the epochs, else a 2%-dense cnn stays at
# chance for every method (validation accuracy about 0.2 for LTH and Ballot alike with 20 epochs, 0.97 with 60).
LONGER = {"digits": ["train_dense.epochs=60", "prune.retrain.epochs=60", "prune.ballot.obs_epochs=60",
                     "prune.ballot.refine_train.epochs=60", "prune.safecompress.epochs=180",
                     "prune.fairscratch.epochs=180"]}
# methods only the matrix needs: elsewhere refine_start 'best' is the default and these equal 'ballot (blend)' and
# 'lth + refined'
MATRIX_VARIANTS = {
    "ballot (blend) best": ["prune.method=ballot", "prune.ballot.layer_budget=blend", "prune.ballot.refine_start=best"],
    "lth + refined best": ["prune.method=lth", "prune.final_train=refined", "prune.ballot.refine_start=best"],
}
DEFAULT_METHODS = ("magnitude", "lth", "lth + refined", "ballot", "ballot (blend)", "ballot (protect)",
                   "ballot (plain retraining)")
# the cost of a unit in epochs of its dataset (for the schedule: longest first)
COST = {"mlp": 0.05, "cnn": 1.0, "resnet20": 2.2, "vgg": 8.0, "resnet18": 12.0}


@dataclass(frozen=True)
class Unit:
    """One (dataset, model, seed): its dense phase is shared by every density and method run on it. ``data``: the
    data set's overrides (DATASETS, or a ``--dataset`` spec's; the default: DATASETS' entry)."""

    dataset: str
    model: str
    seed: int
    data: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """The unit as its records name it (the data set's settings are in the hashed run configuration)."""
        return {"dataset": self.dataset, "model": self.model, "seed": self.seed}


def cell_overrides(unit: Unit) -> list[str]:
    cap = CAPS.get((unit.dataset, unit.model))
    return [*(unit.data or DATASETS[unit.dataset]), f"base.model={unit.model}", f"base.seed={unit.seed}", *COMMON,
            *LONGER.get(unit.dataset, []), *([f"data.max_train_samples={cap}"] if cap else [])]


# settings added after runs were recorded, at the values that reproduce those runs bit for bit
LATER_DEFAULTS = {"precision": "fp32", "granularity": "weight", "share_samples": 32, "recalibrate_bn": False,
                  "layer_budget": "erk", "min_steps": 0, "class_weight_prior_images": 0,
                  "fairness_start": 0, "refine_guard": False, "refine_start": "rewind"}


def _without_later_defaults(tree: Any) -> Any:
    """``tree`` without the LATER_DEFAULTS entries (fp32 is the loop before mixed precision, 'weight' the pruning
    before structured units, 32 the probe of the later 'share' rule, which no earlier run used, False the runs before
    BatchNorm recalibration, 'erk' the per-layer budgets before the rule was a choice, 0 the schedules before their
    min_steps floors and the class weights before their shrinkage, 0 the refined training before deferred weights,
    'rewind' its start before the start was a choice), so the keys of the runs recorded before them stay valid."""
    if isinstance(tree, dict):
        return {k: _without_later_defaults(v) for k, v in tree.items()
                if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    return tree


def run_key(cfg: ExperimentConfig) -> str:
    """Hash of what decides a run's numbers (Ballot's knobs only where they are used)."""
    d = _without_later_defaults(to_dict(cfg))
    prune = dict(d["prune"])
    if cfg.prune.method != "ballot":
        refined = ("refine_train", "fairness_loss_weight", "fairness_start", "class_weight_floor",
                   "class_weight_prior_images", "objective_mcd_weight", "refine_guard", "refine_start")
        prune["ballot"] = {k: v for k, v in prune["ballot"].items() if cfg.prune.refined() and k in refined}
    payload = {"base": {k: v for k, v in d["base"].items() if k != "device"}, "data": d["data"],
               "train_dense": d["train_dense"], "prune": prune}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def dense_key(cfg: ExperimentConfig) -> str:
    from ballot.experiment import dense_manifest

    manifest = _without_later_defaults(dense_manifest(cfg))
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]


def layer_floor_ratio(mask: Any, density: float) -> float:
    """The smallest kept / (density x size) over the mask's layers (1 = a uniform share)."""
    return min(r.kept / (density * r.total) for r in mask.report())


def dense_fingerprint(dense: Any) -> str:
    """A hash of the dense phase's tensors (theta_0, theta_k, theta_T): equal test metrics do not prove two dense
    states equal on a small test split (digits: 360 images), this does."""
    digest = hashlib.sha256()
    for state in (dense.init_state, dense.rewind_state, dense.trained_state):
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


# what a run's floating-point results depend on besides its configuration: runs reproduce only where all are equal
ENVIRONMENT_KEYS = ("threads", "cpu", "torch")


def environment(threads: int) -> dict[str, Any]:
    """This process's ENVIRONMENT_KEYS: intra-op threads, the instruction set torch's CPU kernels use, torch's
    version."""
    import torch

    return {"threads": threads, "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def dense_mismatch(recorded: dict[str, Any], fingerprint: str, metrics: dict[str, Any],
                   here: dict[str, Any] | None = None) -> str | None:
    """How the dense ``recorded`` differs from the cached state with ``fingerprint`` and test ``metrics`` (by hash;
    records older than the hash by test accuracy and CWV), naming the ENVIRONMENT_KEYS the record has and ``here``
    differs in; None when it describes that state."""
    if "fingerprint" in recorded:
        same = recorded["fingerprint"] == fingerprint
        found = None if same else f"hash {fingerprint}, recorded {recorded['fingerprint']}"
    else:
        same = (recorded["test"]["acc"], recorded["test"]["cwv"]) == (metrics["acc"], metrics["cwv"])
        found = None if same else f"test acc {metrics['acc']:.4f}, recorded {recorded['test']['acc']:.4f}"
    if not found or not here:
        return found
    differ = [f"{key} {here.get(key)}, recorded {recorded[key]}" for key in ENVIRONMENT_KEYS
              if key in recorded and recorded[key] != here.get(key)]
    return f"{found}; {'; '.join(differ)}" if differ else found


def _metrics(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in (*METRICS, "per_class")}


def run_unit(unit: Unit, params: dict[str, Any], densities: list[float], methods: dict[str, list[str]],
             out: Path, cache: Path, threads: int, split: str) -> list[dict[str, Any]]:
    """Every missing (density, method) run of ``unit`` (progress lines show ``split``); returns the records written."""
    import torch

    from ballot import experiment

    torch.set_num_threads(threads)
    base = apply_overrides(params, cell_overrides(unit))
    cfg = experiment_from_params(base)
    todo = []
    for density in densities:
        for name, overrides in methods.items():
            run_cfg = experiment_from_params(apply_overrides(base, [f"base.density={density}", *overrides]))
            path = out / "runs" / f"{run_key(run_cfg)}.json"
            if not path.is_file():
                todo.append((density, name, run_cfg, path))
    dense_path = out / "runs" / f"dense-{dense_key(cfg)}.json"
    if not todo and dense_path.is_file():
        return []
    data = experiment.prepare_data(cfg)
    dense_dir = cache / "dense" / dense_key(cfg)
    written = []
    if (dense_dir / experiment.DENSE_MANIFEST).is_file():
        dense, seconds = experiment.load_dense(dense_dir), None  # trained earlier, perhaps for another --out
        model = experiment.new_model(cfg, data)
        model.load_state_dict(dense.trained_state)
    else:
        (model, dense, _), seconds = experiment.timed(experiment.train_dense, cfg, data, progress=False)
        experiment.save_dense(dense, dense_dir, cfg)
    metrics = experiment.model_metrics(model, data, cfg.base.device)
    fingerprint, here = dense_fingerprint(dense), environment(threads)
    if dense_path.is_file():
        found = dense_mismatch(json.loads(dense_path.read_text()), fingerprint, metrics, here)
        if found:
            # another machine, thread count or torch trained this cache: new runs would not be comparable
            print(f"{unit.dataset}/{unit.model} seed {unit.seed}: skipped, the dense state in {dense_dir} is not the "
                  f"one the runs in {out} were built on ({found}); pass the --cache they came from, or another --out",
                  file=sys.stderr, flush=True)
            return []
    else:
        record = {"unit": unit.record(), "method": "dense", "density": 1.0, "seconds": seconds,
                  "fingerprint": fingerprint, **here, "test": _metrics(metrics), "val": _metrics(metrics["val"])}
        write_json(dense_path, record)
        written.append(record)
    for density, name, run_cfg, path in todo:
        result, seconds = experiment.timed(experiment.run_prune, run_cfg, data, dense, progress=False)
        metrics = experiment.model_metrics(result.model, data, run_cfg.base.device)
        record = {"unit": unit.record(), "method": name, "density": density, "seconds": seconds,
                  "dense_fingerprint": fingerprint, **here, "kept_density": result.mask.density(),
                  "layer_floor_ratio": layer_floor_ratio(result.mask, density),
                  "test": _metrics(metrics), "val": _metrics(metrics["val"]), "overrides": methods[name],
                  "final_choice": result.final_choice}  # which rival final training was kept (None: no rival)
        write_json(path, record)
        written.append(record)
        shown = record[split]
        print(f"{unit.dataset}/{unit.model} d={density} seed {unit.seed} {name:<28} {split} acc {shown['acc']:.4f} "
              f"cwv {shown['cwv']:.5f} ({seconds:.0f}s)", file=sys.stderr, flush=True)
    return written


POOL_GRACE_S = 30  # how long interrupted pool workers get after SIGTERM, before SIGKILL


def run_units(units: list[Unit], workers: int, params: dict[str, Any], densities: list[float],
              methods: dict[str, list[str]], out: Path, cache: Path, split: str) -> bool:
    """Every unit's missing runs in ``workers`` processes, which end with this one however it ends; False when
    interrupted (Ctrl-C), after ending them."""
    started = time.perf_counter()
    threads = 1 if workers > 1 else (os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=terminate_with_parent,
                             initargs=(os.getpid(),)) as pool:
        try:
            futures = [pool.submit(run_unit, u, params, densities, methods, out, cache, threads, split) for u in units]
            for done, future in enumerate(as_completed(futures), start=1):
                future.result()
                print(f"[{done}/{len(units)} units done, {time.perf_counter() - started:.0f}s]", file=sys.stderr,
                      flush=True)
        except KeyboardInterrupt:  # also when the signal reached this process alone: leaving the pool would wait;
            stop_children(multiprocessing.active_children(), 0, POOL_GRACE_S)  # a pool worker interrupted takes
            pool.shutdown(cancel_futures=True)                                 # the next unit, so no self-stop
            return False
    return True


def collect(out: Path, units: list[Unit], params: dict[str, Any], densities: list[float],
            methods: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The finished records of the requested grid (a missing run is left out)."""
    rows = []
    for unit in units:
        base = apply_overrides(params, cell_overrides(unit))
        dense_path = out / "runs" / f"dense-{dense_key(experiment_from_params(base))}.json"
        for density in densities:
            if dense_path.is_file():
                rows.append({**json.loads(dense_path.read_text()), "density": density})
            for name, overrides in methods.items():
                run_cfg = experiment_from_params(apply_overrides(base, [f"base.density={density}", *overrides]))
                path = out / "runs" / f"{run_key(run_cfg)}.json"
                if path.is_file():
                    rows.append({**json.loads(path.read_text()), "method": name})
    return rows


Stats = dict[str, tuple[float, float, int]]  # metric -> (mean, std, n)


def cell_of(row: dict[str, Any]) -> tuple[str, str, float]:
    """A record's cell: (dataset, model, density)."""
    return row["unit"]["dataset"], row["unit"]["model"], row["density"]


def summarise(rows: list[dict[str, Any]], split: str) -> dict[tuple[str, str, float], dict[str, Stats]]:
    """(dataset, model, density) -> method -> metric -> (mean, std over seeds, seeds)."""
    table: dict[tuple[str, str, float], dict[str, Stats]] = {}
    for row in rows:
        table.setdefault(cell_of(row), {}).setdefault(row["method"], {})
    for cell, by_method in table.items():
        for method in by_method:
            group = [r for r in rows if cell_of(r) == cell and r["method"] == method]
            for key in METRICS:
                values = [r[split][key] for r in group]
                by_method[method][key] = (statistics.fmean(values),
                                          statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
    return table


def _reduction(ours: float, theirs: float) -> float:
    """Relative CWV reduction (positive = ours fairer); nan where ``theirs`` is 0."""
    return 1 - ours / theirs if theirs > 0 else math.nan


def _cwv_gain(ours: Stats, theirs: Stats) -> float:
    """Relative reduction of the mean CWV."""
    return _reduction(ours["cwv"][0], theirs["cwv"][0])


def _beyond_noise(lower: tuple[float, float, int], higher: tuple[float, float, int]) -> bool:
    """Whether the mean of ``lower`` is below that of ``higher`` by more than the mean of their seed-to-seed std."""
    return higher[0] - lower[0] > (lower[1] + higher[1]) / 2


def _gains(table: dict[tuple[str, str, float], dict[str, Stats]], cells: list[Any], ours: str, theirs: str
           ) -> list[float]:
    """The per-cell CWV reductions of ``ours`` against ``theirs``, leaving out cells where ``theirs`` has CWV 0."""
    return [g for g in (_cwv_gain(table[c][ours], table[c][theirs]) for c in cells) if not math.isnan(g)]


def _seeded(by_method: dict[str, Stats], *methods: str) -> bool:
    """Whether every one of ``methods`` has two or more seeds in the cell (else it has no seed-to-seed noise)."""
    return all(by_method[m]["cwv"][2] >= 2 for m in methods)


def _cells(values: list[float], cells: list[Any]) -> str:
    """'N cells', saying how many were left out for a baseline CWV of 0 (no relative reduction)."""
    dropped = len(cells) - len(values)
    return f"{len(values)} cells" + (f" ({dropped} left out: baseline CWV 0)" if dropped else "")


def _percent(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):+.1f}%" if values else "n/a"


def cell_name(cell: tuple[str, str, float]) -> str:
    return f"{cell[0]}/{cell[1]} d{cell[2]:g}"


def verdict(table: dict[tuple[str, str, float], dict[str, Stats]], split: str, judged: str = "ballot") -> list[str]:
    """The issue's acceptance lines, computed from ``table`` for the method ``judged`` (the conflict ablation only for
    the matrix's own 'ballot', whose budgets 'ballot (protect)' shares). Noise is the mean of the two methods'
    seed-to-seed standard deviations."""
    lines = []
    cells = [c for c, m in table.items() if {judged, "lth"} <= set(m)]
    if not cells:
        return [f"(no cell has both {judged} and lth)"]
    ok_acc = [c for c in cells if table[c][judged]["acc"][0] >= table[c]["lth"]["acc"][0] - 0.01]
    ok_cwv = [c for c in cells if table[c][judged]["cwv"][0] <= table[c]["lth"]["cwv"][0]]
    gains = _gains(table, cells, judged, "lth")
    lines.append(f"- cells with Ballot's mean accuracy >= LTH's - 1 point: {len(ok_acc)} of {len(cells)}")
    lines.append(f"- cells with Ballot's mean CWV <= LTH's: {len(ok_cwv)} of {len(cells)}")
    averaged = 1 - _mean_cwv(table, cells, judged) / _mean_cwv(table, cells, "lth")
    lines.append(f"- Ballot's CWV vs LTH, mean over {_cells(gains, cells)} of the per-cell reduction: "
                 f"{_percent(gains)} (ratio of the cell-averaged CWVs: {100 * averaged:+.1f}%)")
    for other in ("lth + refined", "magnitude"):
        both = [c for c in cells if other in table[c]]
        if both:
            g = _gains(table, both, judged, other)
            lines.append(f"- Ballot's CWV vs {other}, mean over {_cells(g, both)}: {_percent(g)}")
    refined = [c for c in cells if "lth + refined" in table[c] and _seeded(table[c], judged, "lth + refined")]
    if refined:
        beyond = [c for c in refined if _beyond_noise(table[c][judged]["cwv"], table[c]["lth + refined"]["cwv"])]
        named = f" ({', '.join(cell_name(c) for c in beyond)})" if beyond else ""
        lines.append(f"- cells with Ballot's CWV below lth + refined's by more than the seed-to-seed noise: "
                     f"{len(beyond)} of {len(refined)}{named} (cells with two or more seeds of both)")
    ablated = ([c for c in cells if "ballot (protect)" in table[c] and _seeded(table[c], "ballot", "ballot (protect)")]
               if judged == "ballot" else [])
    if ablated:
        fairer = worse = 0
        for c in ablated:
            on, off = table[c]["ballot (protect)"]["cwv"], table[c]["ballot"]["cwv"]
            fairer += _beyond_noise(on, off)
            worse += _beyond_noise(off, on)
        lines.append(f"- conflict component (protect vs none): mean CWV lower by more than the seed-to-seed std in "
                     f"{fairer} of {len(ablated)} cells, higher by more than it in {worse}")
    return lines


def reduction_spread(rows: list[dict[str, Any]], split: str, judged: str, baseline: str,
                     draws: int = 2000) -> tuple[float, int, int] | None:
    """How much the seeds alone move the mean over cells of the per-cell CWV reduction of ``judged`` against
    ``baseline`` (``verdict``'s figure): one standard deviation under a paired bootstrap of each cell's seeds (a drawn
    seed brings both methods' runs on its dense state; a fixed random seed), each cell's deviation scaled by
    sqrt(n / (n - 1)) for its n seeds, the bootstrap's small-sample shrinkage. Returns it, the number of cells with a
    paired seed and how many of them have two or more (the others add no spread); None without a paired cell."""
    pairs: dict[tuple[str, str, float], dict[int, dict[str, float]]] = {}
    for row in rows:
        if row["method"] in (judged, baseline):
            pairs.setdefault(cell_of(row), {}).setdefault(row["unit"]["seed"], {})[row["method"]] = row[split]["cwv"]
    cells = [[(by_seed[s][judged], by_seed[s][baseline]) for s in sorted(by_seed) if len(by_seed[s]) == 2]
             for _, by_seed in sorted(pairs.items())]
    cells = [c for c in cells if c]
    if not cells:
        return None

    def reduction(sample: list[tuple[float, float]]) -> float:
        return _reduction(statistics.fmean(j for j, _ in sample), statistics.fmean(b for _, b in sample))

    varied = [(c, reduction(c), math.sqrt(len(c) / (len(c) - 1))) for c in cells if len(c) > 1]
    varied = [(c, centre, scale) for c, centre, scale in varied if not math.isnan(centre)]
    rng = random.Random(0)
    drawn = [sum(scale * (reduction(rng.choices(c, k=len(c))) - centre) for c, centre, scale in varied) / len(cells)
             for _ in range(draws)]
    finite = [d for d in drawn if not math.isnan(d)]
    return (statistics.stdev(finite) if len(finite) > 1 else math.nan), len(cells), len(varied)


def spread_lines(rows: list[dict[str, Any]], split: str, judged: str) -> list[str]:
    """One line per baseline: the seed noise of the mean per-cell CWV reduction of ``judged`` against it."""
    lines = []
    for baseline in ("lth", "lth + refined"):
        found = reduction_spread(rows, split, judged, baseline)
        if found:
            spread, cells, varied = found
            lines.append(f"- seed noise of the mean per-cell reduction vs {baseline}: ± {100 * spread:.1f} points "
                         f"(one standard deviation, paired bootstrap of the seeds; {cells} cells, {varied} with 2+ "
                         f"seeds)")
    return lines


def _mean_cwv(table: dict, cells: list, method: str) -> float:
    return statistics.fmean(table[c][method]["cwv"][0] for c in cells)


def ordered_cells(table: dict[tuple[str, str, float], dict[str, Stats]]) -> list[tuple[str, str, float]]:
    """The cells in the order of DATASETS and MODELS, densest first."""
    return sorted(table, key=lambda c: (list(DATASETS).index(c[0]) if c[0] in DATASETS else 99,
                                        MODELS.index(c[1]) if c[1] in MODELS else 99, -c[2]))


def summary(table: dict[tuple[str, str, float], dict[str, Stats]], methods: list[str]) -> list[str]:
    """One row per cell: each method's mean accuracy / CWV x 1000, with its seed count where it ran fewer seeds."""
    shown = ["dense", *methods]
    lines = [f"| cell | seeds | {' | '.join(shown)} |", "|" + "---|" * (len(shown) + 2)]
    for cell in [c for c in ordered_cells(table) if set(table[c]) - {"dense"}]:
        seeds = max(stats["acc"][2] for stats in table[cell].values())
        entries = []
        for method in shown:
            s = table[cell].get(method)
            fewer = f" ({s['acc'][2]} seeds)" if s and s["acc"][2] != seeds else ""
            entries.append(f"{s['acc'][0]:.3f} / {1000 * s['cwv'][0]:.1f}{fewer}" if s else "–")
        lines.append(f"| {cell[0]} {cell[1]} d{cell[2]:g} | {seeds} | {' | '.join(entries)} |")
    return lines


def markdown(table: dict[tuple[str, str, float], dict[str, Stats]], split: str, methods: list[str], notes: str,
             judged: str = "ballot", rows: list[dict[str, Any]] | None = None) -> str:
    lines = [f"# Method matrix ({split} split)", "", notes, "", "## Acceptance figures", "",
             *verdict(table, split, judged), *(spread_lines(rows, split, judged) if rows else []), "",
             "## Summary (accuracy / CWV x 1000, mean over seeds)", "", *summary(table, methods), "",
             "## Per cell (mean ± std over seeds; CWV unscaled)", "",
             "| dataset | model | density | method | seeds | acc | CWV | MCD | worst-class acc |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in ordered_cells(table):
        for method in ["dense", *methods]:
            if method not in table[cell]:
                continue
            s = table[cell][method]
            lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]:g} | {method} | {s['acc'][2]} | "
                         f"{s['acc'][0]:.4f} ± {s['acc'][1]:.4f} | {s['cwv'][0]:.5f} ± {s['cwv'][1]:.5f} | "
                         f"{s['mcd'][0]:.4f} ± {s['mcd'][1]:.4f} | {s['worst_class'][0]:.4f} ± {s['worst_class'][1]:.4f} |")
    return "\n".join(lines) + "\n"


def heatmap(table: dict[tuple[str, str, float], dict[str, Stats]], path: Path, split: str,
            judged: str = "ballot") -> None:
    """The relative CWV reduction of ``judged`` per cell against LTH and against LTH + refined training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys((c[0], c[1]) for c in ordered_cells(table)))
    cols = sorted({c[2] for c in table}, reverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(rows) + 2), layout="constrained")  # room for the titles
    for ax, other in zip(axes, ("lth", "lth + refined")):
        grid = [[100 * _cwv_gain(table[(r[0], r[1], d)][judged], table[(r[0], r[1], d)][other])
                 if (r[0], r[1], d) in table and {judged, other} <= set(table[(r[0], r[1], d)]) else math.nan
                 for d in cols] for r in rows]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=-100, vmax=100, aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, "n/a" if math.isnan(value) else f"{value:+.0f}%", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(cols)), [f"density {d:g}" for d in cols])
        ax.set_yticks(range(len(rows)), [f"{r[0]} / {r[1]}" for r in rows] if ax is axes[0] else [])
        ax.set_title(f"CWV reduction vs {other}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"{judged}: CWV reduction (%), green = fairer")
    fig.suptitle(f"CWV of {judged} against the baselines ({split} split, mean over seeds)", fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def damaged_record(out: Path) -> tuple[Path, str] | None:
    """The first record under ``<out>/runs/`` that is not JSON (a truncated copy, a full disk), with the reason."""
    for path in sorted((out / "runs").glob("*.json")):
        try:
            json.loads(path.read_text())
        except ValueError as error:  # UnicodeDecodeError too
            return path, str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", help="params.yaml to start from (default: the library's defaults)")
    parser.add_argument("--datasets", nargs="+", metavar="DATASET",
                        help=f"from {list(DATASETS)} and --dataset names (default: the --dataset names if any, else "
                        "all three)")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a data set of your own, e.g. 'cancer:base.dataset=npz,data.path=runs/cancer.npz'")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, *HELD_OUT_MODELS])
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--resnet-seeds", nargs="+", type=int, help="seeds of the resnet20 cells (default: --seeds)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help=f"from {list(VARIANTS) + list(MATRIX_VARIANTS)} and --variant names")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="an extra method, e.g. 'rho 0.4:prune.method=ballot,prune.ballot.protect_fraction=0.4'")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE", help="override for every run")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="reports/matrix", help="folder for runs/ and the report")
    parser.add_argument("--cache", default="runs/matrix-cache", help="folder for the dense states")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="split of the report")
    parser.add_argument("--report-only", action="store_true", help="render the report from finished runs only")
    parser.add_argument("--judged", help="the method the acceptance figures and the heat-map judge "
                        "(default 'ballot', the recorded matrix's ERK Ballot; the product's Ballot: "
                        "'ballot (blend) best'; 'ballot (blend)' has its budgets and the rewound start)")
    args = parser.parse_args(argv)

    own = parse_extra(args.dataset, "--dataset")
    shadowing = sorted(set(own) & set(DATASETS))
    if shadowing:
        parser.error(f"--dataset {shadowing[0]!r}: a built-in data set's name (its caps and schedules would apply); "
                     "choose another")
    datasets = {**DATASETS, **own}
    args.datasets = args.datasets or [*own] or list(DATASETS)
    strange = [d for d in args.datasets if d not in datasets]
    if strange:
        parser.error(f"unknown dataset(s) {strange}; choose from {list(datasets)} or define one with --dataset")
    known = {**VARIANTS, **MATRIX_VARIANTS, **parse_extra(args.variant)}
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(known)}")
    methods = {m: known[m] for m in args.methods}
    if args.judged and args.judged not in methods:
        parser.error(f"--judged {args.judged!r} is not among --methods {list(methods)}")
    judged = args.judged or "ballot"
    params = load_yaml(args.params) if args.params else {}
    params = apply_overrides({k: v for k, v in params.items() if k in ("base", "data", "train_dense", "prune")}, args.set)
    args.densities = list(dict.fromkeys(args.densities))  # a value given twice is one cell, not two
    units = list(dict.fromkeys(Unit(d, m, s, tuple(datasets[d])) for d in args.datasets for m in args.models
                               for s in (args.resnet_seeds if m == "resnet20" and args.resnet_seeds else args.seeds)))
    fixed = {o.partition("=")[0] for u in units for o in cell_overrides(u)}
    pinned = [s for s in args.set if s.partition("=")[0] in fixed]
    if pinned:
        parser.error(f"--set {pinned[0]}: the matrix sets this key per cell (DATASETS or --dataset, COMMON, LONGER, "
                     "CAPS), which would override it silently; vary it with --variant NAME:KEY=VALUE instead")
    try:  # validate every run's settings once, before any work (a unit's seed is its one setting a method leaves)
        for u in units:
            experiment_from_params(apply_overrides(params, cell_overrides(u)))
        for u in {replace(u, seed=0) for u in units}:
            base = apply_overrides(params, cell_overrides(u))
            for density in args.densities:
                for overrides in methods.values():
                    experiment_from_params(apply_overrides(base, [f"base.density={density}", *overrides]))
    except ConfigError as error:
        parser.error(str(error))
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be at least 1")
    out, cache = Path(args.out), Path(args.cache)
    folders = [("--out", out / "runs"), *([] if args.report_only else [("--cache", cache / "dense")])]
    for flag, folder in folders:
        blocked = file_in_the_way(folder)
        if blocked:
            parser.error(f"{flag} {folder.parent}: {blocked} is a file, not a folder")
    damaged = damaged_record(out)
    if damaged:
        parser.error(f"{damaged[0]}: a damaged run record ({damaged[1]}); delete it, and a run without --report-only "
                     "redoes it")
    if not args.report_only:
        units.sort(key=lambda u: -COST[u.model] * (CAPS.get((u.dataset, u.model)) or 1))
        if not run_units(units, args.workers, params, args.densities, methods, out, cache, args.split):
            print(f"matrix: interrupted; finished runs are kept under {out}, and a re-run resumes", file=sys.stderr)
            return 130
    rows = collect(out, units, params, args.densities, methods)
    table = summarise(rows, args.split)
    run = {(u.dataset, u.model) for u in units}
    caps = ", ".join(f"{d}/{m} {c}" for (d, m), c in CAPS.items() if (d, m) in run)
    notes = (f"Seeds {args.seeds}" + (f" (resnet20: {args.resnet_seeds})" if args.resnet_seeds else "") +
             f"; densities {args.densities}; overrides {args.set or 'none'}. Training-pool caps: {caps or 'none'} "
             f"(before the long tail); validation fraction 0.2; full test sets. {len(rows)} records." +
             (f" Data sets given with --dataset: {'; '.join(args.dataset)}." if args.dataset else ""))
    suffix = "" if args.split == "test" else "_val"
    write_text(out / f"matrix{suffix}.md", markdown(table, args.split, list(methods), notes, judged, rows))
    write_json(out / f"matrix{suffix}.json", {"rows": rows, "methods": methods, "set": args.set})
    drawn = out / f"cwv_gain{suffix}.png"
    if any({judged, "lth", "lth + refined"} <= set(m) for m in table.values()):
        heatmap(table, drawn, args.split, judged)
    elif drawn.is_file():  # an earlier run's, beside a report it no longer matches
        drawn.unlink()
        print(f"no heat map (no cell has {judged}, lth and lth + refined): removed the earlier {drawn}")
    print("\n".join(verdict(table, args.split, judged)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
