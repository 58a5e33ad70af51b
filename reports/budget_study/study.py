"""Validation study of Ballot's per-layer budget rule (reports/budget_study/README.md); not part of the product.

Runs Ballot under three rules for each round's per-layer counts and appends one JSON line per (cell, rule) to
``results.jsonl`` (finished pairs are skipped, so a killed run resumes):

erk     the product's rule (ballot.masks.erk_counts with ``layer_floor``);
ticket  each layer's share of theta_T's global top-k by |w| at the round's density ("the dense ticket's per-layer
        counts"), floored at ``layer_floor`` x its uniform share and capped at the previous round's count; the
        excess over the budget is taken from the layers above their floors in proportion to their margin;
blend   the mean of the erk and ticket counts (odd sums rounded up in name order until the total is exact);
max     the product's ``layer_budget: max`` (each layer's larger density of the two rules, scaled to the budget), added
        later; its fmnist-lt/cnn rows are the matrix's 'ballot (max)' runs read on validation (``source``);
product blend  the product's ``layer_budget: blend`` (the mean of the two densities; floors as in ``shared_counts``),
        added later still, for the resnet20 cells of the blend criterion (``--rules erk "product blend"``).

The dense states come from benchmarks/matrix.py's cache (cells it has not trained are skipped). Usage, from the
repository root: ``.venv/bin/python reports/budget_study/study.py fmnist-lt/cnn/0/0.05 digits/mlp/1/0.02 ...``;
``--rules a b --`` runs only those rules; ``--table`` prints the summary table of the results so far and the
per-seed rows.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, "benchmarks")
from matrix import Unit, cell_overrides, dense_key  # noqa: E402

import ballot.pruning.ballot as ballot_method  # noqa: E402
from ballot import experiment  # noqa: E402
from ballot.config import apply_overrides, experiment_from_params, load_yaml  # noqa: E402
from ballot.fairness import evaluate  # noqa: E402
from ballot.masks import budget, density_schedule  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results.jsonl")
erk_rule = ballot_method.round_counts


def ticket_rule(ctx, shapes):
    floor, trained = ctx.config.ballot.layer_floor, ctx.dense.trained_state
    sizes = {n: trained[n].numel() for n in shapes}
    magnitudes = torch.cat([trained[n].abs().flatten() for n in shapes])
    counts: list[dict[str, int]] = []
    for density in density_schedule(ctx.density, ctx.config.ballot.rounds):
        keep = budget(sum(sizes.values()), density)
        threshold = torch.topk(magnitudes, keep).values[-1]
        cap = counts[-1] if counts else sizes
        low = {n: min(cap[n], max(int(floor * density * sizes[n]), ctx.config.min_per_layer)) for n in shapes}
        wanted = {n: min(cap[n], max(int((trained[n].abs() >= threshold).sum()), low[n])) for n in shapes}
        excess = sum(wanted.values()) - keep
        margin = {n: wanted[n] - low[n] for n in shapes}
        total_margin = sum(margin.values())
        wanted = {n: wanted[n] - int(excess * margin[n] / total_margin) for n in shapes}
        widest = max(shapes, key=lambda n: wanted[n] - low[n])
        wanted[widest] += keep - sum(wanted.values())
        counts.append(wanted)
    return counts


def blend_rule(ctx, shapes):
    counts: list[dict[str, int]] = []
    for erk, ticket in zip(erk_rule(ctx, shapes), ticket_rule(ctx, shapes)):
        mean = {n: (erk[n] + ticket[n]) // 2 for n in erk}
        odd = [n for n in sorted(erk) if (erk[n] + ticket[n]) % 2]
        for n in odd[: sum(erk.values()) - sum(mean.values())]:
            mean[n] += 1
        counts.append(mean)
    return counts


RULES = {"erk": erk_rule, "ticket": ticket_rule, "blend": blend_rule, "max": erk_rule, "product blend": erk_rule}
# rules run through the product's ``layer_budget`` rather than a replacement
PRODUCT_RULE = {"max": "max", "product blend": "blend"}


def run_cell(cell: str, rules: list[str], params: dict) -> None:
    dataset, model, seed, density = cell.split("/")
    base = apply_overrides(params, cell_overrides(Unit(dataset, model, int(seed))))
    cfg = experiment_from_params(base)
    folder = f"runs/matrix-cache/dense/{dense_key(cfg)}"
    if not os.path.isfile(f"{folder}/init.safetensors"):
        print(f"{cell}: no cached dense state, skipped", flush=True)
        return
    data, dense = experiment.prepare_data(cfg), experiment.load_dense(folder)
    for rule in rules:
        ballot_method.round_counts = RULES[rule]
        pruning = experiment_from_params(apply_overrides(base, [
            f"base.density={density}", "prune.method=ballot",
            f"prune.ballot.layer_budget={PRODUCT_RULE.get(rule, 'erk')}"]))
        result = experiment.run_prune(pruning, data, dense, progress=False)
        metrics = evaluate(result.model, data.val.x, data.val.y, data.num_classes)
        kept = result.mask.counts()
        row = {"cell": cell, "rule": rule, "acc": metrics["acc"], "cwv": metrics["cwv"], "mcd": metrics["mcd"],
               "worst": min(a for a in metrics["per_class"] if not math.isnan(a)),
               "layer_density": {n: round(kept[n] / result.mask[n].numel(), 4) for n in kept}}
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{cell} {rule}: val acc {metrics['acc']:.4f} CWV {metrics['cwv'] * 1e3:.2f}e-3", flush=True)


def by_seed(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """The rows by (dataset/model/seed/density, rule); a later row of the same pair replaces an earlier one."""
    runs: dict[str, dict[str, dict]] = {}
    for row in rows:
        runs.setdefault(row["cell"], {})[row["rule"]] = row
    return runs


def table(rows: list[dict], rules: list[str]) -> str:
    """Markdown table: per cell (dataset/model/density) the seed-mean validation accuracy and CWV of each of
    ``rules`` (erk first) over the seeds all of them ran, and each other rule's CWV change against erk."""
    by_cell: dict[str, dict[str, list[dict]]] = {}
    for cell, by_rule in by_seed(rows).items():
        if all(r in by_rule for r in rules):  # paired: only the seeds every rule ran
            dataset, model, _, density = cell.split("/")
            for r in rules:
                by_cell.setdefault(f"{dataset}/{model}/{density}", {}).setdefault(r, []).append(by_rule[r])
    others = rules[1:]
    lines = ["| cell | seeds | " + " | ".join(f"{r} acc / CWV e-3" for r in rules) + " | "
             + " | ".join(f"{r} CWV vs erk" for r in others) + " |", "|---" * (len(rules) + len(others) + 2) + "|"]
    changes: dict[str, list[float]] = {r: [] for r in others}
    for cell, by_rule in by_cell.items():
        mean = {r: (sum(x["acc"] for x in v) / len(v), sum(x["cwv"] for x in v) / len(v)) for r, v in by_rule.items()}
        for rule in others:
            changes[rule].append(mean[rule][1] / mean["erk"][1] - 1)
        lines.append(f"| {cell} | {len(by_rule['erk'])} | "
                     + " | ".join(f"{mean[r][0]:.4f} / {mean[r][1] * 1e3:.2f}" for r in rules) + " | "
                     + " | ".join(f"{changes[r][-1] * 100:+.1f}%" for r in others) + " |")
    if changes[others[0]]:
        lines.append("| mean per-cell change | |" + " |" * len(rules) + " " + " | ".join(
            f"{sum(v) / len(v) * 100:+.1f}% (fairer in {sum(c < 0 for c in v)} of {len(v)})"
            for v in changes.values()) + " |")
    return "\n".join(lines)


def main(cells: list[str], wanted: list[str]) -> None:
    done = {(r["cell"], r["rule"]) for r in map(json.loads, open(RESULTS))} if os.path.exists(RESULTS) else set()
    params = {k: v for k, v in load_yaml("params.yaml").items() if k in ("base", "data", "train_dense", "prune")}
    for cell in cells:
        rules = [rule for rule in wanted if (cell, rule) not in done]
        if rules:
            run_cell(cell, rules, params)


def seed_rows(rows: list[dict]) -> str:
    """Markdown table: one line per (cell, seed), validation accuracy / CWV x 1e3 of each rule."""
    runs = by_seed(rows)
    lines = ["| dataset/model/seed/density | " + " | ".join(RULES) + " |", "|---" * (len(RULES) + 1) + "|"]
    for cell, by_rule in runs.items():
        lines.append(f"| {cell} | " + " | ".join(
            f"{by_rule[r]['acc']:.4f} / {by_rule[r]['cwv'] * 1e3:.2f}" if r in by_rule else "–" for r in RULES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        rows = [json.loads(line) for line in open(RESULTS)]
        print(table(rows, ["erk", "ticket", "blend"]) + "\n\n" + table(rows, ["erk", "max"]) + "\n\n"
              + table(rows, ["erk", "product blend"]) + "\n\n" + seed_rows(rows))
    elif sys.argv[1:2] == ["--rules"]:
        split = sys.argv.index("--")
        main(sys.argv[split + 1:], sys.argv[2:split])
    else:
        main(sys.argv[1:], list(RULES))
