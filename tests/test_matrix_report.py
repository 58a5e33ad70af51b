"""benchmarks/matrix.py: the summary table and the acceptance lines against hand-computed values; resuming never
mixes runs built on different dense states."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ballot.experiment import load_dense

_BENCH = Path(__file__).parents[1] / "benchmarks" / "matrix.py"
_SPEC = importlib.util.spec_from_file_location("matrix_bench", _BENCH)
matrix = sys.modules["matrix_bench"] = importlib.util.module_from_spec(_SPEC)  # its dataclasses look themselves up
_SPEC.loader.exec_module(matrix)


def _row(dataset: str, method: str, seed: int, acc: float, cwv: float) -> dict:
    scores = {"acc": acc, "cwv": cwv, "mcd": 0.1, "worst_class": 0.5}
    return {"unit": {"dataset": dataset, "model": "mlp", "seed": seed}, "method": method, "density": 0.05,
            "test": scores, "val": scores}


ROWS = [
    _row("digits", "dense", 0, 0.98, 0.0010), _row("digits", "dense", 1, 0.96, 0.0030),
    _row("digits", "lth", 0, 0.97, 0.0020), _row("digits", "lth", 1, 0.95, 0.0040),
    _row("digits", "ballot", 0, 0.96, 0.0010), _row("digits", "ballot", 1, 0.94, 0.0020),
    _row("digits", "ballot (protect)", 0, 0.96, 0.0010),
    _row("fmnist-lt", "lth", 0, 0.80, 0.0200), _row("fmnist-lt", "ballot", 0, 0.82, 0.0250),
    {**_row("fmnist", "dense", 0, 0.90, 0.0060), "density": 0.02},  # a cell no method has reached yet
]


def test_summary_gives_mean_accuracy_and_cwv_per_cell_with_short_seed_counts_marked() -> None:
    table = matrix.summarise(ROWS, "test")
    lines = matrix.summary(table, ["lth", "ballot", "ballot (protect)"])
    assert lines[0] == "| cell | seeds | dense | lth | ballot | ballot (protect) |"
    assert lines[2] == "| fmnist-lt mlp d0.05 | 1 | – | 0.800 / 20.0 | 0.820 / 25.0 | – |"  # DATASETS order
    assert lines[3] == "| digits mlp d0.05 | 2 | 0.970 / 2.0 | 0.960 / 3.0 | 0.950 / 1.5 | 0.960 / 1.0 (1 seeds) |"
    assert len(lines) == 4, "a cell with nothing but its dense model has no row"


def test_acceptance_lines_count_cells_and_average_the_per_cell_reductions() -> None:
    lines = matrix.verdict(matrix.summarise(ROWS, "test"), "test")
    # digits: ballot 0.950 vs lth 0.960 (within 1 point), CWV 1.5 vs 3.0; fmnist-lt: 0.82 vs 0.80, CWV 25 vs 20
    assert lines[0] == "- cells with Ballot's mean accuracy >= LTH's - 1 point: 2 of 2"
    assert lines[1] == "- cells with Ballot's mean CWV <= LTH's: 1 of 2"
    # per-cell reductions +50% and -25% -> +12.5%; cell-averaged CWV 13.25 vs 11.5 x 1e-3 -> -15.2%
    assert lines[2] == ("- Ballot's CWV vs LTH, mean over 2 cells of the per-cell reduction: +12.5% (ratio of the "
                        "cell-averaged CWVs: -15.2%)")
    assert not any("conflict component" in line for line in lines), "one seed of 'ballot (protect)': no noise to judge"
    perfect = [*ROWS, _row("wine", "lth", 0, 1.0, 0.0), _row("wine", "ballot", 0, 1.0, 0.0)]
    assert matrix.verdict(matrix.summarise(perfect, "test"), "test")[2].startswith(
        "- Ballot's CWV vs LTH, mean over 2 cells (1 left out: baseline CWV 0) of the per-cell reduction: +12.5%")


def test_the_reductions_seed_noise_comes_from_a_paired_bootstrap_of_the_seeds() -> None:
    # ROWS: on digits both seeds halve LTH's CWV, so no resampling moves the reduction; fmnist-lt has one seed
    assert matrix.reduction_spread(ROWS, "test", "ballot", "lth") == (0.0, 2, 1)
    assert matrix.spread_lines(ROWS, "test", "ballot") == [
        "- seed noise of the mean per-cell reduction vs lth: ± 0.0 points (one standard deviation, paired bootstrap "
        "of the seeds; 2 cells, 1 with 2+ seeds)"]
    # ballot 1 and 3 on seeds 0 and 1, lth 2 and 4: a resample gives 1 - 1/2 (seed 0 twice), 1 - 3/4 (seed 1 twice)
    # or 1/3 (both), with probabilities 1/4, 1/4, 1/2: a standard deviation of 0.0908, x sqrt(2/1) for two seeds =
    # 0.1284. Resampling the two methods' seeds independently would give about 0.45.
    rows = [_row("digits", "ballot", 0, 0.9, 0.001), _row("digits", "ballot", 1, 0.9, 0.003),
            _row("digits", "lth", 0, 0.9, 0.002), _row("digits", "lth", 1, 0.9, 0.004),
            _row("digits", "lth", 2, 0.9, 0.009)]  # a seed only one method ran is left out
    spread, cells, varied = matrix.reduction_spread(rows, "test", "ballot", "lth")
    assert (cells, varied) == (1, 1) and spread == pytest.approx(0.1284, abs=0.01)
    assert matrix.reduction_spread(list(reversed(rows)), "test", "ballot", "lth") == (spread, 1, 1), "order-free"
    assert matrix.reduction_spread(rows, "test", "ballot", "lth + refined") is None
    # a baseline seed at CWV 0 makes some resamples undefined: they are left out, the report still renders
    zero = [_row("digits", "ballot", 0, 0.9, 0.001), _row("digits", "ballot", 1, 0.9, 0.003),
            _row("digits", "lth", 0, 0.9, 0.0), _row("digits", "lth", 1, 0.9, 0.002)]
    assert matrix.reduction_spread(zero, "test", "ballot", "lth")[0] > 0


def test_a_unit_whose_cached_dense_state_differs_from_its_records_gets_no_new_runs(tmp_path: Path, capsys) -> None:
    unit, out, cache = matrix.Unit("digits", "mlp", 0), tmp_path / "out", tmp_path / "cache"
    magnitude, random = {"magnitude": matrix.VARIANTS["magnitude"]}, {"random": matrix.VARIANTS["random"]}
    written = matrix.run_unit(unit, {}, [0.5], magnitude, out, cache, 1, "test")
    assert [r["method"] for r in written] == ["dense", "magnitude"]
    fingerprint = matrix.dense_fingerprint(load_dense(next((cache / "dense").iterdir())))
    assert written[0]["fingerprint"] == written[1]["dense_fingerprint"] == fingerprint
    here = matrix.environment(1)
    assert all(r[key] == here[key] for r in written for key in matrix.ENVIRONMENT_KEYS)
    dense_record = next((out / "runs").glob("dense-*.json"))
    true_record = json.loads(dense_record.read_text())
    # equal test metrics do not make two dense states equal: the hash of the tensors decides
    dense_record.write_text(json.dumps({**true_record, "fingerprint": "0" * 20, "cpu": "elsewhere"}))
    assert matrix.run_unit(unit, {}, [0.5], random, out, cache, 1, "test") == []
    err = capsys.readouterr().err
    assert "skipped, the dense state" in err and f"hash {fingerprint}, recorded {'0' * 20}" in err
    assert f"cpu {here['cpu']}, recorded elsewhere" in err and "threads" not in err, "it names what differs"
    # a record written before the hash existed is compared on its dense test metrics
    older = {k: v for k, v in true_record.items() if k not in ("fingerprint", *matrix.ENVIRONMENT_KEYS)}
    dense_record.write_text(json.dumps({**older, "test": {**older["test"], "acc": 0.5}}))
    assert matrix.run_unit(unit, {}, [0.5], random, out, cache, 1, "test") == []
    assert "skipped, the dense state" in capsys.readouterr().err
    assert len(list((out / "runs").glob("*.json"))) == 2, "nothing was added to the unit"
    dense_record.write_text(json.dumps(older))
    assert [r["method"] for r in matrix.run_unit(unit, {}, [0.5], random, out, cache, 1, "test")] == ["random"]
    dense_record.write_text(json.dumps(true_record))
    lth = {"lth": matrix.VARIANTS["lth"], "lth + refined best": matrix.MATRIX_VARIANTS["lth + refined best"]}
    plain, best = matrix.run_unit(unit, {}, [0.5], lth, out, cache, 1, "test")
    assert [plain["method"], best["method"]] == list(lth), "the same hash: new runs go ahead"
    assert written[1]["final_choice"] is plain["final_choice"] is None, "a plain final training has no rival"
    assert set(best["final_choice"]["objectives"]) == {"refined from theta_k", "refined from theta_T"}


@pytest.mark.parametrize("flags, message", [
    (["--methods", "lth", "--densities", "0"], "base.density: must be in (0, 1]"),
    (["--methods", "lth", "odd", "--variant", "odd:prune.ballot.roundz=2"], "unknown key(s) ['roundz']"),
    (["--methods", "lth", "--set", "prune.ballot.layer_budget=blend"],
     "--set prune.ballot.layer_budget=blend: the matrix sets this key"),
    (["--methods", "lth", "--datasets", "digits", "--set", "train_dense.epochs=5"],
     "--set train_dense.epochs=5: the matrix sets this key"),
])
def test_settings_the_matrix_would_ignore_or_refuse_are_named_before_any_work(tmp_path: Path, capsys, flags,
                                                                               message) -> None:
    with pytest.raises(SystemExit) as stop:
        matrix.main(["--report-only", "--out", str(tmp_path), "--models", "mlp", *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_dense_mismatch_names_the_environment_only_where_the_state_differs() -> None:
    recorded = {"fingerprint": "a" * 20, "threads": 1, "cpu": "AVX2", "torch": "2.14.1"}
    here = {"threads": 2, "cpu": "AVX2", "torch": "2.14.1"}
    assert matrix.dense_mismatch(recorded, "a" * 20, {}, here) is None, "the same tensors: the environment is moot"
    differs = f"hash {'b' * 20}, recorded {'a' * 20}"
    assert matrix.dense_mismatch(recorded, "b" * 20, {}, here) == f"{differs}; threads 2, recorded 1"
    assert matrix.dense_mismatch(recorded, "b" * 20, {}, {**here, "threads": 1}) == differs


def test_the_matrix_pins_the_rewound_start_and_its_best_methods_take_the_products_choice() -> None:
    from ballot.config import apply_overrides, experiment_from_params, to_dict

    base = apply_overrides({}, matrix.cell_overrides(matrix.Unit("digits", "mlp", 0)))
    known = {**matrix.VARIANTS, **matrix.MATRIX_VARIANTS}
    configs = {name: experiment_from_params(apply_overrides(base, known[name]))
               for name in ("ballot (blend)", "ballot (blend) best", "lth + refined", "lth + refined best")}
    assert [cfg.prune.ballot.refine_start for cfg in configs.values()] == ["rewind", "best", "rewind", "best"]
    assert experiment_from_params({}).prune.ballot.refine_start == "best"  # the product's default
    assert len({matrix.run_key(cfg) for cfg in configs.values()}) == 4
    # a recorded (rewound) run keeps the key it had before the start was a choice
    assert "refine_start" not in json.dumps(matrix._without_later_defaults(to_dict(configs["ballot (blend)"])))


def test_paired_refuses_two_different_runs_under_one_method_name(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("paired_bench", _BENCH.parent / "paired.py")
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    first, copy = tmp_path / "a", tmp_path / "b"
    for folder in (first, copy):
        folder.mkdir()
        (folder / "1.json").write_text(json.dumps(_row("digits", "ballot", 0, 0.9, 0.001)))
    records = paired.seed_records([first, copy])  # the same record twice (a copied folder) is one record
    assert records[("digits", "mlp", 0.05)][0]["ballot"]["test"]["cwv"] == 0.001
    (first / "2.json").write_text(json.dumps(_row("digits", "ballot", 0, 0.9, 0.002)))  # another configuration
    with pytest.raises(SystemExit, match="two different 'ballot' runs of digits/mlp/0.05 seed 0"):
        paired.seed_records([first])


@pytest.mark.slow
def test_a_data_set_of_your_own_runs_through_the_matrix_in_place_of_the_three(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    x = (rng.normal(size=(120, 6)) + y[:, None] * 1.5).astype(np.float32)
    np.savez(tmp_path / "blobs.npz", x=x, y=y)
    spec = f"blobs:base.dataset=npz,data.path={tmp_path / 'blobs.npz'}"
    out = tmp_path / "out"
    flags = ["--dataset", spec, "--models", "mlp", "--seeds", "0", "--densities", "0.5", "--methods", "lth",
             "--workers", "1", "--out", str(out), "--cache", str(tmp_path / "cache"),
             "--set", "train_dense.epochs=2", "--set", "prune.retrain.epochs=2"]
    # as a user runs it: its worker processes import the script by path
    subprocess.run([sys.executable, str(_BENCH), *flags], check=True, capture_output=True, timeout=300)
    records = [json.loads(path.read_text()) for path in (out / "runs").glob("*.json")]
    assert sorted(r["method"] for r in records) == ["dense", "lth"]
    assert all(r["unit"] == {"dataset": "blobs", "model": "mlp", "seed": 0} for r in records)
    report = (out / "matrix.md").read_text()
    assert "| blobs | mlp | 0.5 | lth | 1 |" in report and "fmnist" not in report
    assert f"Data sets given with --dataset: {spec}." in report
    with pytest.raises(SystemExit) as stop:  # a name neither built in nor defined
        matrix.main(["--report-only", "--out", str(out), "--datasets", "blobz", "--dataset", spec])
    assert stop.value.code == 2 and "unknown dataset(s) ['blobz']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a built-in name would bring its caps and schedules along
        matrix.main(["--report-only", "--out", str(out), "--dataset", "digits:base.dataset=npz,data.path=x.npz"])
    assert stop.value.code == 2 and "--dataset 'digits': a built-in data set's name" in capsys.readouterr().err
