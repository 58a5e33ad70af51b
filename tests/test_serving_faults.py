"""Start-up faults of the service's registry look-up: bounded when the server is unreachable, no new database."""

from __future__ import annotations

import time

import pytest

from serving.errors import ModelSourceError
from serving.model_source import fetch_model

pytest.importorskip("mlflow")


def test_an_unreachable_registry_fails_fast_with_its_address(capsys):
    started = time.perf_counter()
    with pytest.raises(ModelSourceError, match="127.0.0.1:1"):
        with fetch_model("models:/ballot@champion", "http://127.0.0.1:1", timeout=2):
            pass
    assert time.perf_counter() - started < 30, "the look-up is bounded (MLflow alone retries for minutes)"
    assert "gives up after 2 s" in capsys.readouterr().err, "it says what it is waiting for"


def test_a_missing_sqlite_registry_is_an_error_not_a_new_database(tmp_path):
    missing = tmp_path / "nope.db"
    with pytest.raises(ModelSourceError, match="the sqlite file does not exist"):
        with fetch_model("models:/ballot@champion", f"sqlite:///{missing}"):
            pass
    assert not missing.exists()


def test_ballot_serve_does_not_import_the_training_stack(tmp_path):
    import subprocess
    import sys

    probe = ("import sys\nfrom ballot.cli import main\ntry:\n    main(['serve', '--model-uri', 'missing.onnx'])\n"
             "except SystemExit as stop:\n    print('exit', stop.code)\nprint('torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.stdout.split() == ["exit", "2", "False"], run.stdout + run.stderr
    assert "model file 'missing.onnx' not found" in run.stderr
