"""Whether a registered model version is whole: the one rule `ballot promote`, `ballot serve` and a later
register's clean-up of a killed one (ballot.tracking.fail_orphan_runs) all apply.

`ballot register` creates the version with every tag in one call, moves its alias to it, records that move on its
run (``REGISTERED_TAG``: the version) and ends the run FINISHED. So a version is complete when its run finished,
when an alias points at it, or when its run recorded the alias move (a register killed after it, before the run
ended). Anything else is a registration that failed, was killed before its alias moved, or is still running. A
version registered outside a run (by hand) counts as complete.
"""

from __future__ import annotations

from typing import Any

REGISTERED_TAG = "ballot.registered_version"


def is_complete(version: Any, run: Any | None) -> bool:
    """Whether ``version`` (an MLflow ModelVersion read whole, so with its aliases) is a complete registration, given
    ``run``, the run that created it (None: created outside a run)."""
    if run is None:
        return True
    return (run.info.status == "FINISHED" or bool(version.aliases)
            or run.data.tags.get(REGISTERED_TAG) == str(version.version))


def incomplete_reason(client: Any, version: Any) -> str | None:
    """None when ``version`` is complete (``is_complete``), else one line saying why not; MLflow's errors reading its
    run propagate."""
    if not version.run_id:
        return None
    run = client.get_run(version.run_id)
    if is_complete(version, run):
        return None
    return (f"version {version.version} comes from run {version.run_id}, which is {run.info.status} and never "
            "moved an alias to it: its registration did not complete (it failed, was killed, or is still running)")
