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


def guard_choice(guard: Mapping[str, Any]) -> str:
    """'plain training (val objective refined 0.6123, plain 0.7000)': the refine guard's record in words."""
    refined, plain = _number(guard["refined_objective"], 4), _number(guard["plain_objective"], 4)
    return f"{guard['kept']} training (val objective refined {refined}, plain {plain})"


def summary(metrics: Mapping[str, Any]) -> str:
    """The summary block of a pruned model, one labelled line each.

    ``metrics`` has ``method``, ``density`` (fraction kept), ``acc``, ``cwv``, ``mcd``, ``worst_class`` and
    ``worst_class_name``; optionally ``dense`` ({acc, cwv, mcd} of the dense model), ``refine_guard`` (the guard's
    record: which final training it kept and both validation objectives), ``onnx_bytes`` and ``registration``
    ({name, version, alias}). Unknown numbers (None, NaN) read 'n/a'.
    """
    dense = metrics.get("dense") or {}
    density = metrics["density"]
    rows = [
        ("method", str(metrics["method"])),
        ("density", f"{density:.4f} kept ({1 - density:.1%} pruned)"),
        ("accuracy", _against_dense(metrics["acc"], dense.get("acc"), 4, points=True)),
        ("CWV", _against_dense(metrics["cwv"], dense.get("cwv"), 5)),
        ("MCD", _against_dense(metrics["mcd"], dense.get("mcd"), 4)),
        ("worst class", f"{metrics.get('worst_class_name') or 'n/a'} {_number(metrics['worst_class'], 4)}"),
    ]
    if metrics.get("refine_guard"):
        rows.append(("guard kept", guard_choice(metrics["refine_guard"])))
    if metrics.get("onnx_bytes") is not None:
        rows.append(("ONNX", file_size(int(metrics["onnx_bytes"]))))
    registration = metrics.get("registration")
    if registration:
        rows.append(("registered", f"{registration['name']} version {registration['version']} "
                                   f"@{registration['alias']}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)
