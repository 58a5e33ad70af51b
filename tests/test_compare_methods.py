"""benchmarks/compare_methods.py: Ballot's relative change against each baseline, including a baseline whose CWV
is exactly 0 (every class equally accurate, as on an easy data set)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_BENCH = Path(__file__).parents[1] / "benchmarks" / "compare_methods.py"
_SPEC = importlib.util.spec_from_file_location("compare_methods_bench", _BENCH)
compare = sys.modules["compare_methods_bench"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare)


def _stats(acc: float, cwv: float, mcd: float, seconds: float) -> dict[str, tuple[float, float]]:
    return {"acc": (acc, 0.0), "cwv": (cwv, 0.0), "mcd": (mcd, 0.0), "worst_class": (acc, 0.0),
            "prune_seconds": (seconds, 0.0), "total_seconds": (seconds, 0.0)}


def test_relative_change_against_a_nonzero_baseline_is_a_signed_percentage() -> None:
    assert compare.relative_change(0.003, 0.004) == "-25.0%"
    assert compare.relative_change(0.005, 0.004) == "+25.0%"


def test_a_baseline_at_zero_cwv_is_reported_without_dividing_by_it() -> None:
    assert compare.relative_change(0.0, 0.0) == "level (both 0)"
    assert compare.relative_change(0.002, 0.0) == "0.00200 against 0"


def test_improvements_name_each_baseline_with_hand_computed_changes() -> None:
    summary = {"lth": _stats(0.90, 0.0, 0.0, 10.0), "magnitude": _stats(0.80, 0.004, 0.2, 5.0),
               "ballot": _stats(0.91, 0.002, 0.1, 20.0)}
    lines = compare.improvements(summary)
    by_base = {line.split(":")[0]: line for line in lines}
    assert by_base["- vs lth"] == ("- vs lth: CWV 0.00200 against 0, MCD 0.10000 against 0 (negative = fairer), "
                                   "accuracy +1.00 points, wall time (dense + prune) 2.00x")
    assert by_base["- vs magnitude"] == ("- vs magnitude: CWV -50.0%, MCD -50.0% (negative = fairer), "
                                         "accuracy +11.00 points, wall time (dense + prune) 4.00x")


def test_each_row_records_which_final_training_was_kept() -> None:
    from ballot.config import apply_overrides
    from tests.conftest import TINY

    rows = {row["method"]: row for row in compare.run(apply_overrides({}, TINY), [0], ["lth", "lth + refined"])}
    assert "final_choice" not in rows["dense"]
    assert rows["lth"]["final_choice"] is None, "a plain final training has no rival"
    choice = rows["lth + refined"]["final_choice"]  # refine_start 'best', the default: both starts compete
    assert set(choice["objectives"]) == {"refined from theta_k", "refined from theta_T"}
    assert choice["kept"] in choice["objectives"]
