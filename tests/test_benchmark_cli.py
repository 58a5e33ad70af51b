"""The command lines of benchmarks/matrix.py and benchmarks/compare_methods.py: bad input refused before any work, in
one line; an interrupted or killed matrix leaves no worker training on."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.proc import children, needs_proc_children, survivors

_BENCH = Path(__file__).parents[1] / "benchmarks"


def _load(script: str, name: str):
    if name not in sys.modules:  # another test module may have loaded it under this name
        spec = importlib.util.spec_from_file_location(name, _BENCH / script)
        sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


matrix = _load("matrix.py", "matrix_bench")
compare = _load("compare_methods.py", "compare_methods_bench")


@pytest.mark.slow
@needs_proc_children
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_matrix_alone_leaves_no_worker_training(tmp_path: Path, signal_number: int) -> None:
    """`kill -INT`, `-TERM` or `-9` of the main process: its worker (and multiprocessing's resource tracker) ends."""
    command = [sys.executable, str(_BENCH / "matrix.py"), "--datasets", "digits", "--models", "mlp", "--seeds", "0",
               "--densities", "0.5", "--methods", "lth", "--workers", "1", "--out", str(tmp_path / "out"),
               "--cache", str(tmp_path / "cache")]
    log = tmp_path / "matrix.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while len(started := children(process.pid)) < 2 and time.monotonic() < deadline:  # tracker, worker
                time.sleep(0.2)
            time.sleep(5)  # the worker imports torch and trains (digits: 60 epochs, well over 5 s)
            assert process.poll() is None, log.read_text()[-3000:]
            os.kill(process.pid, signal_number)
            process.wait(timeout=60)
        finally:
            process.kill()
            process.wait()
    left = survivors(started, within_s=30)
    assert len(started) == 2 and left == [], log.read_text()[-3000:]
    if signal_number == signal.SIGINT:
        text = log.read_text()
        assert process.returncode == 130 and "Traceback" not in text, text[-3000:]
        assert text.count("matrix: interrupted; finished runs are kept under") == 1, text[-3000:]


def _refused(main, argv: list[str], capsys) -> str:
    """The one line ``main`` refuses ``argv`` with (exit code 2, argparse's)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, message", [
    (["--report-only", "--out", "{file}"], "--out {file}: {file} is a file, not a folder"),
    (["--out", "{file}"], "--out {file}: {file} is a file, not a folder"),
    (["--cache", "{file}/dense"], "--cache {file}/dense: {file} is a file, not a folder"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--seeds", "0", str(2**64)], f"base.seed: must be in [-2**63, 2**64) (torch's range), got {2**64}"),
    (["--models", "resnet20", "--resnet-seeds", str(2**64)], "base.seed: must be in [-2**63, 2**64)"),
], ids=["out-report-only", "out", "cache", "workers", "seeds", "resnet-seeds"])
def test_the_matrix_refuses_folders_workers_and_seeds_it_cannot_use_before_any_work(tmp_path: Path, capsys,
                                                                                    monkeypatch, flags,
                                                                                    message) -> None:
    monkeypatch.setattr(matrix, "run_units", lambda *args: pytest.fail("the matrix started training"))
    file = tmp_path / "a-file"
    file.write_text("")
    argv = ["--datasets", "digits", "--models", "mlp", "--methods", "lth", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), *(flag.format(file=file) for flag in flags)]
    assert message.format(file=file) in _refused(matrix.main, argv, capsys)


def test_a_damaged_run_record_is_named_with_what_to_do(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(matrix, "run_units", lambda *args: pytest.fail("the matrix started training"))
    from ballot.config import apply_overrides, experiment_from_params

    cell = apply_overrides({}, [*matrix.cell_overrides(matrix.Unit("digits", "mlp", 0)), "base.density=0.05"])
    key = matrix.run_key(experiment_from_params(apply_overrides(cell, matrix.VARIANTS["lth"])))
    record = tmp_path / "out" / "runs" / f"{key}.json"  # the run the report reads
    record.parent.mkdir(parents=True)
    record.write_text('{"unit": {"dataset": "dig')  # a truncated copy
    argv = ["--datasets", "digits", "--models", "mlp", "--seeds", "0", "--densities", "0.05", "--methods", "lth",
            "--out", str(tmp_path / "out")]
    for extra in (["--report-only"], ["--cache", str(tmp_path / "cache")]):
        assert _refused(matrix.main, [*argv, *extra], capsys).endswith(
            f"error: {record}: a damaged run record (Unterminated string starting at: line 1 column 22 "
            "(char 21)); delete it, and a run without --report-only redoes it")


def test_a_report_without_a_heat_map_removes_the_earlier_one(tmp_path: Path, capsys) -> None:
    earlier = tmp_path / "cwv_gain.png"
    earlier.write_bytes(b"an earlier run's heat map")
    assert matrix.main(["--report-only", "--out", str(tmp_path), "--datasets", "digits", "--models", "mlp",
                        "--methods", "lth", "magnitude"]) == 0
    assert not earlier.exists() and (tmp_path / "matrix.md").is_file()
    assert (f"no heat map (no cell has ballot, lth and lth + refined): removed the earlier {earlier}"
            in capsys.readouterr().out)


class _Started(Exception):
    """compare_methods.main reached its runs."""


@pytest.mark.parametrize("flags, message", [
    (["--out", "{file}"], "--out {file}: {file} is a file, not a folder"),
    (["--out", "{file}/reports"], "--out {file}/reports: {file} is a file, not a folder"),
    (["--set", "prune.nope=1"], "prune: unknown key(s) ['nope']"),
    (["--set", "prune"], "override 'prune' must look like group.key=value"),
    (["--seeds", "0", str(2**64)], f"base.seed: must be in [-2**63, 2**64) (torch's range), got {2**64}"),
], ids=["out", "under-a-file", "unknown-key", "malformed", "seed"])
def test_compare_methods_refuses_an_unusable_out_or_setting_before_any_run(tmp_path: Path, capsys, monkeypatch,
                                                                           flags, message) -> None:
    monkeypatch.setattr(compare, "run", lambda *args: pytest.fail("the comparison started training"))
    file = tmp_path / "a-file"
    file.write_text("")
    argv = ["--methods", "lth", "--out", str(tmp_path / "out"), *(flag.format(file=file) for flag in flags)]
    assert message.format(file=file) in _refused(compare.main, argv, capsys)


def test_compare_methods_runs_a_seed_or_method_given_twice_once(tmp_path: Path, monkeypatch) -> None:
    runs = []

    def run(params, seeds, variants):
        runs.append((seeds, variants))
        raise _Started

    monkeypatch.setattr(compare, "run", run)
    with pytest.raises(_Started):
        compare.main(["--seeds", "2", "0", "2", "0", "--methods", "lth", "random", "lth", "--out", str(tmp_path)])
    assert runs == [([2, 0], ["lth", "random"])]


def test_a_one_row_heat_maps_title_clears_the_panel_titles(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    figures = []
    monkeypatch.setattr(matrix, "atomic_write", lambda path, write: figures.append(plt.gcf()))
    scores = {"acc": 0.9, "cwv": 0.002, "mcd": 0.1, "worst_class": 0.5}
    rows = [{"unit": {"dataset": "digits", "model": "mlp", "seed": 0}, "method": method, "density": 0.05,
             "test": scores} for method in ("ballot", "lth", "lth + refined")]
    matrix.heatmap(matrix.summarise(rows, "test"), tmp_path / "cwv_gain.png", "test")
    figure = figures[0]
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    title = next(text for text in figure.findobj(Text) if text.get_text().startswith("CWV of ballot against"))
    title = title.get_window_extent(renderer)
    assert not any(title.overlaps(ax.title.get_window_extent(renderer)) for ax in figure.axes[:2])
