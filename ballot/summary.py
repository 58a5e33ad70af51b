"""The few lines a run ends with: method, density, accuracy against dense, fairness, and what was shipped."""

from __future__ import annotations

import math
from typing import Any, Mapping


def _known(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if _known(value) else "n/a"


def _against_dense(value: Any, dense: Any, digits: int, points: bool = False) -> str:
    """'0.8123 (dense 0.8450, -3.3 pts)' with ``points``, else '0.01116 (dense 0.01736)'; no dense part when
    the dense value is unknown."""
    if not _known(dense):
        return _number(value, digits)
    delta = f", {100 * (value - dense):+.1f} pts" if points and _known(value) else ""
    return f"{_number(value, digits)} (dense {dense:.{digits}f}{delta})"


def file_size(n_bytes: int) -> str:
    """'812 B', '14.2 KiB', '1.06 MiB'."""
    if n_bytes < 1024:
        return f"{n_bytes} B"
    if n_bytes < 1024 ** 2:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes / 1024 ** 2:.2f} MiB"


def final_choice_text(choice: Mapping[str, Any]) -> str:
    """'plain (val objective 0.7000; refined 0.6123)': which of the competing final trainings was kept, in words."""
    kept, objectives = choice["kept"], choice["objectives"]
    rivals = ", ".join(f"{label} {_number(value, 4)}" for label, value in objectives.items() if label != kept)
    return f"{kept} (val objective {_number(objectives[kept], 4)}; {rivals})"


def _alias_moved(registration: Mapping[str, Any]) -> str:
    """'' while the alias still points at the registered version (or was not looked up), else where it points now
    or why that could not be read."""
    alias = registration["alias"]
    if "alias_unchecked" in registration:
        return f" (@{alias} not checked: {registration['alias_unchecked']})"
    if "alias_now" not in registration or registration["alias_now"] == str(registration["version"]):
        return ""
    if registration["alias_now"] is None:
        return f" (the registry has no @{alias} now)"
    return f" (@{alias} now points to version {registration['alias_now']})"


def summary(metrics: Mapping[str, Any]) -> str:
    """The summary block of a pruned model, one labelled line each.

    ``metrics`` has ``method``, ``density`` (fraction kept), ``acc``, ``cwv``, ``mcd``, ``worst_class`` and
    ``worst_class_name``; optionally ``dense`` ({acc, cwv, mcd} of the dense model), ``final_choice`` (which of
    competing final trainings was kept, and their validation objectives), ``onnx_bytes`` and ``registration``
    ({name, version, alias}; ``stale`` true when register.json registered an earlier export, not this model;
    ``alias_now``: the version the alias points at in the registry now, None when none; ``alias_unchecked``: why
    that could not be read).
    Unknown numbers (None, NaN) read 'n/a'.
    """
    dense = metrics.get("dense") or {}
    density = metrics["density"]
    rows = [
        ("method", str(metrics["method"])),
        ("density", f"{density:.4f} kept ({1 - density:.1%} pruned)" if _known(density) else "n/a"),
        ("accuracy", _against_dense(metrics["acc"], dense.get("acc"), 4, points=True)),
        ("CWV", _against_dense(metrics["cwv"], dense.get("cwv"), 5)),
        ("MCD", _against_dense(metrics["mcd"], dense.get("mcd"), 4)),
        ("worst class", f"{metrics.get('worst_class_name') or 'n/a'} {_number(metrics['worst_class'], 4)}"),
    ]
    if metrics.get("final_choice"):
        rows.append(("final training", final_choice_text(metrics["final_choice"])))
    if metrics.get("onnx_bytes") is not None:
        rows.append(("ONNX", file_size(int(metrics["onnx_bytes"])) if _known(metrics["onnx_bytes"]) else "n/a"))
    registration = metrics.get("registration")
    if registration and registration.get("stale"):
        rows.append(("registered", f"not this model (register.json names version {registration['version']} of an "
                                   "earlier export; run the register stage)"))
    elif registration:
        rows.append(("registered", f"{registration['name']} version {registration['version']} "
                                   f"@{registration['alias']}{_alias_moved(registration)}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)
