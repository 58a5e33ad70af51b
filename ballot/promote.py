"""The promotion gate: `champion` moves to a registered version only when it is accurate and fair enough.

A candidate passes when its test accuracy is at most ``max_acc_drop`` below its dense model's (version
tags ``acc`` and ``dense_acc``) and, when a champion exists, its CWV is at most ``cwv_tolerance`` times
the champion's (tag ``cwv``). mlflow is imported only by ``promote``, so the CLI stays quick to load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ballot.config import PromoteConfig
from ballot.errors import PromotionError
from ballot.tracking import CHAMPION
from serving.registration import incomplete_reason

_SLACK = 1e-12  # float noise must not decide a tie at the boundary


@dataclass
class Decision:
    """Whether the candidate passed, and one line per check saying why."""

    promoted: bool
    reasons: list[str] = field(default_factory=list)
    headline: str = ""

    def message(self) -> str:
        return "\n".join([self.headline, *(f"  - {reason}" for reason in self.reasons)])


def _number(tags: Mapping[str, str], key: str, who: str) -> float:
    if key not in tags:
        raise PromotionError(f"{who} has no '{key}' tag (was it registered by the pipeline's register stage?)")
    try:
        value = float(tags[key])
    except ValueError:
        raise PromotionError(f"{who}: tag '{key}' is not a number: {tags[key]!r}") from None
    if not math.isfinite(value):
        raise PromotionError(f"{who}: tag '{key}' is not finite: {tags[key]!r}")
    return value


def gate(candidate: Mapping[str, str], champion: Mapping[str, str] | None, cfg: PromoteConfig,
         champion_label: str = "the champion") -> tuple[bool, list[str]]:
    """(passed, reasons) for a candidate's version tags against the champion's (None: no champion yet)."""
    acc, dense_acc = _number(candidate, "acc", "candidate"), _number(candidate, "dense_acc", "candidate")
    drop = dense_acc - acc
    acc_ok = drop <= cfg.max_acc_drop + _SLACK
    reasons = [f"accuracy {acc:.4f} is {abs(drop):.4f} {'below' if drop > 0 else 'above'} the dense model's "
               f"{dense_acc:.4f} (allowed drop {cfg.max_acc_drop}): {'ok' if acc_ok else 'too large a drop'}"]
    cwv_ok = True
    if champion is None:
        reasons.append("no current champion: the CWV check does not apply")
    else:
        cwv, best = _number(candidate, "cwv", "candidate"), _number(champion, "cwv", champion_label)
        limit = best * cfg.cwv_tolerance
        cwv_ok = cwv <= limit + _SLACK
        reasons.append(f"CWV {cwv:.6f} vs {champion_label}'s {best:.6f} x {cfg.cwv_tolerance} = {limit:.6f}: "
                       f"{'ok' if cwv_ok else 'less fair than allowed'}")
    return acc_ok and cwv_ok, reasons


def _check_complete(client: Any, candidate: Any, name: str) -> None:
    """PromotionError unless ``candidate`` is a complete registration (serving.registration states the rule)."""
    from mlflow.exceptions import MlflowException

    try:
        reason = incomplete_reason(client, candidate)
    except MlflowException as error:
        raise PromotionError(f"cannot read run {candidate.run_id} that registered {name} version "
                             f"{candidate.version}: {error.message}") from None
    if reason:
        raise PromotionError(f"{name} {reason}; register the model again")


def promote(client: Any, name: str, version: str, cfg: PromoteConfig) -> Decision:
    """Check version ``version`` of ``name`` against the gate; move ``champion`` to it only if it passes."""
    from mlflow.exceptions import MlflowException

    try:
        candidate = client.get_model_version(name, str(version))
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise PromotionError(f"model '{name}' has no version '{version}': {error.message}") from None
        raise PromotionError(f"cannot read version '{version}' of model '{name}' from the registry: "
                             f"{error.message}") from None
    _check_complete(client, candidate, name)
    try:  # the alias list says whether a champion exists; any error reading it must stop the gate
        aliases = client.get_registered_model(name).aliases
        champion = client.get_model_version(name, str(aliases[CHAMPION])) if CHAMPION in aliases else None
    except MlflowException as error:
        raise PromotionError(f"cannot read @{CHAMPION} of model '{name}' from the registry: {error.message}"
                             ) from None
    if champion is not None and champion.version == candidate.version:
        return Decision(True, [], f"{name} version {version} already is @{CHAMPION}")
    label = f"champion (version {champion.version})" if champion is not None else "the champion"
    passed, reasons = gate(candidate.tags, None if champion is None else champion.tags, cfg, label)
    before = f"version {champion.version}" if champion is not None else "no version"
    if not passed:
        return Decision(False, reasons, f"refused: {name} version {version} does not pass the promotion gate; "
                                        f"@{CHAMPION} stays on {before}")
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    return Decision(True, reasons, f"promoted: {name} version {version} is now @{CHAMPION} (was {before})")
