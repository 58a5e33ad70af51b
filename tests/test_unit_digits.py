"""benchmarks/unit_digits.py: its commands are the configurations its table names, and its paired figures are right."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ballot.cli import _config_from_args, build_parser

_BENCH = Path(__file__).parents[1] / "benchmarks" / "unit_digits.py"
_SPEC = importlib.util.spec_from_file_location("unit_digits", _BENCH)
unit_digits = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(unit_digits)


@pytest.mark.parametrize("method", list(unit_digits.METHODS))
def test_each_command_runs_the_method_its_row_is_named_after(method: str, tmp_path: Path) -> None:
    args = build_parser().parse_args(unit_digits.command("cnn", method, 3, tmp_path)[1:])
    cfg = _config_from_args(args)
    assert (cfg.base.dataset, cfg.base.model, cfg.base.seed, cfg.base.density) == ("digits", "cnn", 3, 0.25)
    assert cfg.prune.granularity == "unit" and method.startswith(cfg.prune.method)
    assert cfg.prune.refined() == (method != "magnitude (unit)")


def _row(method: str, seed: int, cwv: float) -> dict:
    scores = {"acc": 0.9, "cwv": cwv, "mcd": 0.1, "worst_class": 0.8}
    return {"model": "cnn", "method": method, "seed": seed, "threads": 1, "density": 0.25,
            "test": {**scores, "per_class": [0.9] * 10}, "val": scores, "dense_test": scores}


def test_paired_gaps_match_a_hand_computed_mean_and_standard_error() -> None:
    rows = [_row("ballot (unit)", 0, 1e-4), _row("ballot (unit)", 1, 4e-4), _row("ballot (unit)", 2, 2e-4),
            _row("magnitude (unit)", 0, 2e-4), _row("magnitude (unit)", 1, 1e-4), _row("magnitude (unit)", 2, 2e-4)]
    # gaps x 1e4: -1, +3, 0 -> mean 0.67, std sqrt(((-1.67)^2 + 2.33^2 + 0.67^2) / 2) = 2.08, SE 2.08 / sqrt(3) = 1.20
    assert unit_digits.paired(rows, "cnn", "magnitude (unit)") == (
        "+0.67 ± 1.20 (SE), ballot lower at 1, level at 1, higher at 1 of 3 seeds")
    assert unit_digits.paired(rows[:1] + rows[3:4], "cnn", "magnitude (unit)") == "fewer than two paired seeds"


def test_report_only_renders_the_stored_records_without_running(tmp_path: Path) -> None:
    rows = [_row("ballot (unit)", s, 1e-4 * (s + 1)) for s in range(2)]
    (tmp_path / "runs.json").write_text(json.dumps(rows))
    assert unit_digits.main(["--report-only", "--out", str(tmp_path), "--work", str(tmp_path / "none")]) == 0
    table = (tmp_path / "unit_digits.md").read_text()
    assert "| cnn | ballot (unit) | 2 | 0.9000 | 0.9000 ± 0.0000 | 1.50 ± 0.71 | 0.8000 |" in table
    assert not (tmp_path / "none").exists()
