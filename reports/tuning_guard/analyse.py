"""What the noise guard (ballot.tuning.significance) decides on the studies of run.sh, and whether it should.

`analyse.py OUT` reads every OUT/NAME/seedK/ written by run.sh and prints two tables:

1. **Split-half, validation only** (the basis of the default level). Each study's validation split is cut in two
   class-stratified halves, `SPLITS` times. On half A every feasible trial is scored, the best is picked and the
   guard's win probability against the baseline trial is measured on A; half B then says how much that pick really
   gains over the baseline (objective acc - 0.5 MCD on B). For each level L the policy "take the pick when its win
   probability on A is at least L, else the baseline" gains that B-difference or 0; the table gives each policy's
   mean gain (x 1e3) per cell and over all studies. L = 0 is the study without the guard; L > 1 never leaves the
   baseline.
2. **Full validation, then test**: the study's best trial, its win probability on the whole validation split, what
   the guard at the default level keeps, and the test figures of the defaults and of the best trial (read after).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import optuna
import torch

from ballot.config import experiment_from_params
from ballot.experiment import prepare_data
from ballot.fairness import fairness_objective
from ballot.tuning.significance import CORRECT_ATTR, unpack_correct, win_probability

LEVELS = (0.0, 0.5, 0.8, 0.9, 0.95, 1.01)
SPLITS = 40
MCD_WEIGHT = 0.5
DEFAULT_LEVEL = 0.9


def objective(correct: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """acc - 0.5 x MCD of a per-sample correctness record, over the classes present."""
    per_class = [correct[labels == c].double().mean() for c in range(num_classes) if bool((labels == c).any())]
    return fairness_objective({"acc": float(correct.double().mean()),
                               "mcd": float(max(per_class) - min(per_class))}, MCD_WEIGHT)


def halves(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two class-stratified halves of the positions of ``labels`` (a class of one sample goes to A)."""
    a, b = [], []
    for c in torch.unique(labels).tolist():
        positions = torch.nonzero(labels == c).flatten()
        positions = positions[torch.randperm(len(positions), generator=generator)]
        cut = (len(positions) + 1) // 2
        a.append(positions[:cut])
        b.append(positions[cut:])
    return torch.cat(a), torch.cat(b)


def load(root: Path) -> tuple[torch.Tensor, int, dict[int, torch.Tensor], dict]:
    """(validation labels, classes, {trial number: record} of the feasible complete trials, test metrics)."""
    cfg = experiment_from_params(json.loads((root / "default" / "config.json").read_text()))
    data = prepare_data(cfg)
    labels = data.val.y.long()
    storage = f"sqlite:///{root / 'tune' / 'study.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    records = {t.number: unpack_correct(t.user_attrs[CORRECT_ATTR], len(labels)) for t in study.trials
               if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("feasible")}
    test = {arm: json.loads((root / arm / "metrics.json").read_text()) for arm in ("default", "tuned")}
    return labels, data.num_classes, records, test


def split_half_gains(labels: torch.Tensor, classes: int, records: dict[int, torch.Tensor]) -> dict[float, float]:
    """Mean gain on half B (x 1e3) of each level's policy, over SPLITS splits."""
    gains = {level: [] for level in LEVELS}
    generator = torch.Generator().manual_seed(0)
    for _ in range(SPLITS):
        a, b = halves(labels, generator)
        scores = {n: objective(r[a], labels[a], classes) for n, r in records.items()}
        pick = max(scores, key=lambda n: (scores[n], -n))
        p = 0.0 if pick == 0 else win_probability(records[0][a], records[pick][a], labels[a], classes, MCD_WEIGHT,
                                                  resamples=500)
        gain = objective(records[pick][b], labels[b], classes) - objective(records[0][b], labels[b], classes)
        for level in LEVELS:
            gains[level].append(gain if pick != 0 and p >= level else 0.0)
    return {level: 1e3 * statistics.mean(values) for level, values in gains.items()}


def main() -> None:
    out = Path(sys.argv[1])
    roots = sorted(p.parents[1] for p in out.glob("*/seed*/tune/study.db")
                   if (p.parents[1] / "tuned" / "metrics.json").is_file())
    print("| study | feasible trials | " + " | ".join(f"L = {lv:g}" if lv <= 1 else "baseline only"
                                                   for lv in LEVELS) + " |")
    print("|---|---|" + "---|" * len(LEVELS))
    totals, rows = {level: [] for level in LEVELS}, []
    for root in roots:
        labels, classes, records, test = load(root)
        name = f"{root.parent.name} {root.name}"
        if 0 not in records:
            print(f"| {name} | {len(records)} | baseline infeasible: nothing to guard |")
            continue
        gains = split_half_gains(labels, classes, records)
        for level, gain in gains.items():
            totals[level].append(gain)
        print(f"| {name} | {len(records)} | " + " | ".join(f"{gains[lv]:+.1f}" for lv in LEVELS) + " |", flush=True)
        scores = {n: objective(r, labels, classes) for n, r in records.items()}
        best = max(scores, key=lambda n: (scores[n], -n))
        p = 0.0 if best == 0 else win_probability(records[0], records[best], labels, classes, MCD_WEIGHT)
        rows.append((name, best, scores[best] - scores[0], p, test))
    print("| mean over studies | | " + " | ".join(f"{statistics.mean(totals[lv]):+.1f}" for lv in LEVELS) + " |")
    print("\n| study | best trial | val objective gain x 1e3 | win probability | guard at 0.9 keeps | "
          "test defaults: acc / CWV x 1e3 / objective | test best trial: acc / CWV x 1e3 / objective |")
    print("|---|---|---|---|---|---|---|")
    for name, best, gain, p, test in rows:
        kept = "best" if best != 0 and p >= DEFAULT_LEVEL else "defaults"
        cells = [f"{m['acc']:.4f} / {1e3 * m['cwv']:.1f} / {fairness_objective(m, MCD_WEIGHT):.4f}"
                 for m in (test["default"], test["tuned"])]
        print(f"| {name} | {best} | {1e3 * gain:+.1f} | {p:.3f} | {kept} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
