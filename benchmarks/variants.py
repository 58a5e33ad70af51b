"""The methods the benchmarks compare: name -> overrides of the prune group (the method first)."""

from __future__ import annotations

VARIANTS: dict[str, list[str]] = {
    "random": ["prune.method=random"],
    "magnitude": ["prune.method=magnitude"],
    "lth": ["prune.method=lth"],
    "lth-oneshot": ["prune.method=lth", "prune.lth_rounds=1"],
    # the strong baseline: LTH's mask with the same refined, fairness-weighted training Ballot gets
    "lth + refined": ["prune.method=lth", "prune.final_train=refined"],
    "safecompress": ["prune.method=safecompress"],
    "fairscratch": ["prune.method=fairscratch"],
    "ballot": ["prune.method=ballot"],
    "ballot (protect)": ["prune.method=ballot", "prune.ballot.conflict=protect"],
    "ballot (veto)": ["prune.method=ballot", "prune.ballot.conflict=veto"],
    "ballot (plain retraining)": ["prune.method=ballot", "prune.final_train=plain"],
    # per-layer budgets: the larger of ERK's and the dense ticket's (reports/budget_study/)
    "ballot (max)": ["prune.method=ballot", "prune.ballot.layer_budget=max"],
    # the product's default budgets, the mean of the two; benchmarks/matrix.py pins ERK for its recorded 'ballot' rows
    "ballot (blend)": ["prune.method=ballot", "prune.ballot.layer_budget=blend"],
    # structured: whole neurons / channels (L1-norm filter pruning, and Ballot's unit votes); docs/deploy.md
    "magnitude (unit)": ["prune.method=magnitude", "prune.granularity=unit"],
    # L1 filter pruning's units with Ballot's refined training: what Ballot's unit votes add beyond the refinement
    "magnitude (unit) + refined": ["prune.method=magnitude", "prune.granularity=unit", "prune.final_train=refined"],
    "ballot (unit)": ["prune.method=ballot", "prune.granularity=unit"],
}
BASELINES = ("random", "magnitude", "lth", "lth-oneshot", "lth + refined", "safecompress", "fairscratch",
             "magnitude (unit)", "magnitude (unit) + refined")
METRICS = ("acc", "cwv", "mcd", "worst_class")


def parse_extra(specs: list[str], flag: str = "--variant") -> dict[str, list[str]]:
    """Named override lists from 'NAME:key=value,key=value' (e.g. 'ballot rho 0.4:prune.method=ballot,...'), as
    ``flag`` (named in the error) gives them."""
    extra = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        if not sep or not name.strip() or not body.strip():
            raise SystemExit(f"{flag} '{spec}' must look like NAME:group.key=value[,group.key=value...]")
        extra[name.strip()] = [item.strip() for item in body.split(",") if item.strip()]
    return extra
