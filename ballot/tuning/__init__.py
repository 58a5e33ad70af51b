"""Optuna search over Ballot's knobs (docs/tuning.md).

space        search space from params (``tune.space``), applying values to a config, best_params.yaml I/O
objective    one trial: Ballot on the shared dense model, validation objective, feasibility, per-epoch reports
study        storage URLs, sampler and pruner, creating or joining a study, workers with an exact budget
mlflow_runs  one parent MLflow run per study, one nested run per trial (our own callback)
kept         the chosen trial's model, kept so that the prune stage can reuse it
report       chosen trial, Pareto front, summary, trial table, plots
runner       ``run_study``: all of the above in one call, for `ballot tune` and the tune stage
"""


