"""Stage prune: the configured method on the dense states -> mask, sparse model, details (Ballot: vote history).

When the tune stage kept a trial model made with exactly this stage's recipe (ballot.tuning.kept), that model is
the result and nothing is trained again.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict

from ballot.config import ExperimentConfig
from ballot.experiment import (
    check_fits,
    load_dense,
    load_pruned,
    lost_learning_warning,
    model_metrics,
    run_prune,
    save_pruned,
    timed,
)
from ballot.snapshot import load_snapshot
from ballot.summary import final_choice_text
from ballot.storage import staged_folder, write_json
from ballot.tuning.kept import KEPT_FILE, find_kept, prune_recipe
from ballot.tuning.space import apply_best
from pipelines.common import BEST_PARAMS, DATA, DENSE, PRUNE, TUNE_CHOSEN, read_json, run_stage


def main(cfg: ExperimentConfig) -> None:
    cfg, tuned = apply_best(cfg, BEST_PARAMS)  # the tune stage's choice (tune.use_best; Ballot only)
    if tuned:
        print(f"prune: applying {len(tuned)} tuned value(s) from {BEST_PARAMS}")
    data = load_snapshot(DATA)
    check_fits(cfg, data)
    dense = load_dense(DENSE)
    kept = find_kept(TUNE_CHOSEN, prune_recipe(cfg, dense))
    with staged_folder(PRUNE) as folder:
        if kept is not None:
            print(f"prune: reusing tune trial {kept.trial}'s model from {kept.folder} (the same recipe: data, "
                  "dense states and every prune setting; docs/tuning.md)")
            shutil.copytree(kept.folder, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(KEPT_FILE))
            model, mask = load_pruned(folder, cfg, data)
            seconds = kept.seconds
        else:
            result, seconds = timed(run_prune, cfg, data, dense)
            model, mask = result.model, result.mask
        metrics = model_metrics(model, data, cfg.base.device)
        metrics.update(method=cfg.prune.method, density=mask.density(), target_density=cfg.base.density,
                       seconds=seconds, reused_trial=kept.trial if kept else None)
        if kept is None:
            save_pruned(folder, result, metrics, cfg, tuned_params=tuned)
        else:  # the trial recorded its sampled values; what was applied here also holds the objective's weight
            write_json(folder / "metrics.json", metrics)
            write_json(folder / "details.json", {**read_json(folder / "details.json"), "tuned_params": tuned})
        report = [{**asdict(layer), "density": layer.density} for layer in mask.report()]
        write_json(folder / "mask_report.json", report)
    took = f"trained in {seconds:.1f}s by tune trial {kept.trial}" if kept else f"{seconds:.1f}s"
    print(f"prune: {cfg.prune.method}  acc {metrics['acc']:.4f}  cwv {metrics['cwv']:.5f}  mcd {metrics['mcd']:.4f}  "
          f"density {metrics['density']:.4f}  ({took}) -> {PRUNE}")
    if choice := read_json(PRUNE / "details.json").get("final_choice"):
        print(f"prune: final training kept: {final_choice_text(choice)}")
    if warning := lost_learning_warning(metrics["val"], read_json(DENSE / "metrics.json")["val"]):
        print(warning, file=sys.stderr)


if __name__ == "__main__":
    run_stage("prune", main)
