"""What a study produced: the chosen trial, the Pareto front, a metrics-style summary, a trial table and plots.

Choice rules (only feasible trials are ever chosen; see ``ballot.tuning.objective``):
- single mode: the feasible COMPLETE trial with the highest objective (``Study.best_trial``, constraint-aware);
- multi mode: among the feasible Pareto-optimal trials (``Study.best_trials``), the one with the lowest val CWV,
  ties broken by higher val acc, then the lower trial number.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ballot.storage import atomic_write, write_json
from ballot.tuning.objective import BASELINE, SURPLUS
from ballot.tuning.study import FINISHED

METRICS = ("objective", "val_acc", "val_cwv", "val_mcd", "val_worst_class")


def choose(study: optuna.Study) -> FrozenTrial | None:
    """The trial whose knobs go to best_params.yaml, by the module's rules; None when no trial is feasible."""
    if len(study.directions) == 1:
        try:
            return study.best_trial
        except ValueError:  # nothing completed, or nothing feasible
            return None
    front = pareto_front(study)
    return min(front, key=lambda t: (t.values[1], -t.values[0], t.number)) if front else None


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible Pareto-optimal trials of a multi-objective study, by trial number."""
    return sorted(study.best_trials, key=lambda t: t.number)


def _seconds(trial: FrozenTrial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def _metrics(trial: FrozenTrial | None) -> dict[str, Any] | None:
    if trial is None:
        return None
    return {"number": trial.number, **{k: trial.user_attrs[k] for k in METRICS if k in trial.user_attrs}}


def summarise(study: optuna.Study, n_trials: int, chosen: FrozenTrial | None) -> dict[str, Any]:
    """Study summary in metrics.json form: trial counts, compute spent and saved, the chosen and baseline trials."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    surplus = [t for t in trials if t.user_attrs.get(SURPLUS)]
    run = sum(t.user_attrs.get("epochs_run", 0) for t in finished)
    planned = sum(t.user_attrs.get("epochs_planned", 0) for t in finished)
    times = [t for t in trials if t.datetime_start is not None and t.datetime_complete is not None]
    span = (max(t.datetime_complete for t in times) - min(t.datetime_start for t in times)).total_seconds() \
        if times else 0.0
    baseline = next((t for t in complete if t.user_attrs.get(BASELINE)), None)
    return {
        "study": study.study_name,
        "n_trials_requested": n_trials,
        "trials": {
            "finished": len(finished),
            "complete": len(complete),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials) - len(surplus),
            "surplus": len(surplus),
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "feasible": sum(bool(t.user_attrs.get("feasible")) for t in complete),
            "infeasible": sum(t.user_attrs.get("feasible") is False for t in complete),
        },
        "epochs": {"run": run, "planned": planned, "saved_by_pruner": planned - run},
        "seconds": {"trials": sum(_seconds(t) for t in finished), "span": span},
        "dense_val_acc": study.user_attrs.get("dense_val_acc"),
        "best": _metrics(chosen),
        "baseline": _metrics(baseline),
    }


def no_choice_reason(summary: dict[str, Any], max_acc_drop: float) -> str:
    """Why a study chose no trial, in one clause, from its ``summarise`` summary."""
    trials = summary["trials"]
    if trials["complete"] == 0:
        return f"no feasible trial: none completed ({trials['pruned']} pruned, {trials['failed']} failed)"
    dense = summary["dense_val_acc"]
    return (f"no feasible trial: none reached val acc {dense - max_acc_drop:.4f} (the dense model's {dense:.4f} - "
            f"tune.max_acc_drop {max_acc_drop}); where this density costs more accuracy, raise tune.max_acc_drop")


def trial_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, params, values, recorded metrics and seconds."""
    return [{"number": t.number, "state": t.state.name, "params": t.params, "values": t.values,
             "constraints": t.constraints, "user_attrs": t.user_attrs, "seconds": _seconds(t)}
            for t in study.get_trials(deepcopy=False)]


def trial_curve(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat row per finished trial, in trial order (the rows of the DVC linear plot of the study)."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    return [{**_metrics(t), "trial": t.number} for t in sorted(done, key=lambda t: t.number)]


def draw_plots(study: optuna.Study, folder: Path) -> tuple[list[Path], dict[str, str]]:
    """history.png, importances.png, and intermediate.png (single) or pareto_front.png (multi), in ``folder``.

    Returns the files written and, for each plot that could not be drawn (e.g. too few trials), the reason.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    multi = len(study.directions) > 1
    cwv = {"target": lambda t: t.values[1], "target_name": "val CWV"} if multi else {}
    plots = {"history": lambda: vis.plot_optimization_history(study, **cwv),
             "importances": lambda: vis.plot_param_importances(study, **cwv)}
    if multi:
        plots["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=["val acc", "val CWV"])
    else:
        plots["intermediate"] = lambda: vis.plot_intermediate_values(study)
    written, skipped = [], {}
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            skipped[name] = str(error) or type(error).__name__
            continue
        figure = axes.figure
        figure.set_size_inches(8, 5)
        path = folder / f"{name}.png"
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
        plt.close(figure)
        written.append(path)
    return written, skipped


def write_report(study: optuna.Study, n_trials: int, chosen: FrozenTrial | None, folder: Path) -> tuple[dict, list]:
    """summary.json, trials.json, trial_curve.json, pareto_front.json (multi) and plots/*.png into ``folder``;
    (summary, files)."""
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    summary = summarise(study, n_trials, chosen)
    plots, skipped = draw_plots(study, folder / "plots")
    summary["plots_skipped"] = skipped
    files = [write_json(folder / "trials.json", trial_table(study)),
             write_json(folder / "trial_curve.json", trial_curve(study))]
    if len(study.directions) > 1:
        front = [{**_metrics(t), "params": t.params, "chosen": chosen is not None and t.number == chosen.number}
                 for t in pareto_front(study)]
        files.append(write_json(folder / "pareto_front.json", front))
    files.insert(0, write_json(folder / "summary.json", summary))
    return summary, files + plots
