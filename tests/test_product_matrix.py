"""benchmarks/product_matrix.py: a cell comes whole from the last folder where the judged method ran, on its seeds
only, and the acceptance lines judge that method."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # matrix's dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


matrix = _load("matrix")
product = _load("product_matrix")
JUDGED = "ballot (blend)"


def _row(dataset: str, method: str, seed: int, acc: float, cwv: float, density: float = 0.05) -> dict:
    scores = {"acc": acc, "cwv": cwv, "mcd": 0.1, "worst_class": 0.5}
    return {"unit": {"dataset": dataset, "model": "cnn", "seed": seed}, "method": method, "density": density,
            "test": scores, "val": scores}


# the recorded matrix: digits has lth on seeds 0-2 but the judged method on seeds 1 and 2 only (and on seed 3, which
# has no lth); fmnist has lth only; the matrix's own ERK 'ballot' and its protect ablation ran on digits
OLD = [_row("digits", "lth", 0, 0.50, 0.090), _row("digits", "lth", 1, 0.90, 0.010),
       _row("digits", "lth", 2, 0.90, 0.010),
       _row("digits", JUDGED, 1, 0.92, 0.005), _row("digits", JUDGED, 2, 0.92, 0.005),
       _row("digits", JUDGED, 3, 0.10, 0.500),
       _row("digits", "ballot", 1, 0.92, 0.009), _row("digits", "ballot (protect)", 1, 0.92, 0.001),
       _row("fmnist", "lth", 0, 0.80, 0.030), _row("fmnist", "lth", 0, 0.70, 0.040, density=0.02)]
# a report that ran fmnist again on other dense states, the judged method included, at density 0.05 only, and
# digits' lth alone (no judged method there: digits stays with the recorded matrix)
NEW = [_row("fmnist", "lth", 0, 0.82, 0.020), _row("fmnist", JUDGED, 0, 0.815, 0.015),
       _row("fmnist", "lth", 1, 0.84, 0.040), _row("fmnist", JUDGED, 1, 0.835, 0.025),
       _row("fmnist", "lth + refined", 0, 0.82, 0.030), _row("fmnist", "lth + refined", 1, 0.82, 0.030),
       _row("digits", "lth", 1, 0.30, 0.300)]


def test_each_cell_comes_whole_from_the_last_folder_with_the_judged_method_on_its_seeds_with_lth() -> None:
    rows, origins = product.merge([("old", OLD), ("new", NEW)], JUDGED)
    assert origins == {("digits", "cnn", 0.05): "old", ("fmnist", "cnn", 0.05): "new"}
    digits = sorted((r["method"], r["unit"]["seed"]) for r in rows if r["unit"]["dataset"] == "digits")
    assert digits == [("ballot", 1), ("ballot (blend)", 1), ("ballot (blend)", 2), ("ballot (protect)", 1),
                      ("lth", 1), ("lth", 2)], "seeds 0 (no judged run) and 3 (no lth) are unpaired: left out"
    assert [r["test"]["acc"] for r in rows if r["unit"]["dataset"] == "fmnist" and r["method"] == "lth"] == [0.82, 0.84]
    assert not any(r["density"] == 0.02 for r in rows), "a cell without the judged method is left out"


def test_acceptance_lines_judge_the_named_method_against_hand_computed_values() -> None:
    rows, _ = product.merge([("old", OLD), ("new", NEW)], JUDGED)
    lines = matrix.verdict(product.summarise(rows, "test"), "test", JUDGED)
    # digits (seeds 1, 2): 0.92 vs 0.90, CWV 5 vs 10 (-50%); fmnist: 0.825 vs 0.83 (within a point), CWV 20 vs 30
    # (-33.3%); lth's seed 0 on digits (0.50 / 90) would change all three if it were counted
    assert lines[0] == "- cells with Ballot's mean accuracy >= LTH's - 1 point: 2 of 2"
    assert lines[1] == "- cells with Ballot's mean CWV <= LTH's: 2 of 2"
    assert lines[2] == ("- Ballot's CWV vs LTH, mean over 2 cells of the per-cell reduction: +41.7% (ratio of the "
                        "cell-averaged CWVs: +37.5%)")
    # fmnist: CWV 20 +- 7.1 against lth + refined's 30 +- 0: 33.3% lower, beyond the noise (7.1 + 0) / 2
    assert lines[3] == "- Ballot's CWV vs lth + refined, mean over 1 cells: +33.3%"
    assert lines[4] == ("- cells with Ballot's CWV below lth + refined's by more than the seed-to-seed noise: 1 of 1 "
                        "(fmnist/cnn d0.05) (cells with two or more seeds of both)")
    assert len(lines) == 5, "no conflict ablation line: 'ballot (protect)' shares the ERK budgets, not blend's"
    erk = matrix.verdict(product.summarise(rows, "test"), "test", "ballot")
    assert not any(line.startswith("- conflict component") for line in erk), "one seed each: no noise to judge by"
    two = [*rows, _row("digits", "ballot", 2, 0.92, 0.009), _row("digits", "ballot (protect)", 2, 0.92, 0.003)]
    erk = matrix.verdict(product.summarise(two, "test"), "test", "ballot")
    assert erk[-1] == ("- conflict component (protect vs none): mean CWV lower by more than the seed-to-seed std in "
                       "1 of 1 cells, higher by more than it in 0"), "the matrix's own 'ballot' keeps it"


def test_the_script_writes_the_report_and_refuses_a_folder_without_records(tmp_path: Path) -> None:
    for name, rows in (("old", OLD), ("new", NEW)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "matrix.json").write_text(json.dumps({"rows": rows}))
    out = tmp_path / "out"
    product.main([str(tmp_path / "old"), str(tmp_path / "new"), "--out", str(out), "--methods", "lth"])
    report = (out / "matrix.md").read_text()
    assert "| fmnist cnn d0.05 | 2 | – | 0.830 / 30.0 | 0.825 / 20.0 |" in report
    assert "- seed noise of the mean per-cell reduction vs lth: ± " in report, "the merged rows reach the report"
    assert (out / "cwv_gain.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="matrix.json not found"):
        product.main([str(tmp_path / "missing")])
