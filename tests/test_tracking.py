"""ballot.tracking and ballot.promote against a real MLflow registry (sqlite in a temp folder)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ballot.cli import main
from ballot.config import PromoteConfig
from ballot.errors import PromotionError, RegistryError, StorageError
from ballot.export import export_onnx
from ballot.promote import gate, promote
from ballot.tracking import (
    CHALLENGER,
    CHAMPION,
    VERSION_TAG_KEYS,
    check_server,
    check_store,
    connect,
    fail_orphan_runs,
    flatten,
    numeric_metrics,
    register_onnx,
    register_run,
    resolve_tracking_uri,
    tag_value,
)
from serving.errors import ModelSourceError
from serving.model_source import fetch_model
from serving.registration import REGISTERED_TAG, incomplete_reason

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A fresh sqlite tracking store shared by this module's tests (each test uses its own model name)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    client = connect(uri)
    mlflow.set_experiment("tests")
    yield uri, client
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri("sqlite:///mlflow.db") == "http://tracking:5000"
    assert resolve_tracking_uri("sqlite:///mlflow.db", "sqlite:///other.db") == "sqlite:///other.db"


def test_metrics_are_flattened_to_finite_numbers_under_safe_names():
    tree = {"acc": 0.9, "per_class": {"T-shirt/top": 0.8, "bag (x)": 0.7, "empty": None}, "name": "lth",
            "flag": True, "cwv": math.nan, "dense": {"acc": 1}}
    assert numeric_metrics(tree, "m.") == {"m.acc": 0.9, "m.per_class.T-shirt/top": 0.8, "m.per_class.bag _x_": 0.7,
                                           "m.dense.acc": 1.0}
    assert flatten({"a": {"b": {"c": [1, 2]}}, "d": 3}) == {"a.b.c": [1, 2], "d": 3}
    assert tag_value("digits") == "digits" and tag_value([1, 8, 8]) == "[1, 8, 8]" and tag_value(0.5) == "0.5"


def _tiny_onnx(path, seed: int) -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).eval()
    export_onnx(model, (1, 2, 3), path, {"dataset": "toy"})
    return model, torch.rand(2, 1, 2, 3).numpy()


def _card(acc: float) -> dict:
    return {"density": 0.5, "acc": acc, "cwv": 0.01, "mcd": 0.2, "worst_class": 0.6, "dataset": "toy",
            "method": "lth", "model": "linear", "class_names": ["a", "b", "c"], "input_shape": [1, 2, 3],
            "dense_acc": 0.9}


def test_register_onnx_follows_the_registry_contract(registry, tmp_path):
    import mlflow.onnx
    import onnxruntime as ort

    uri, client = registry
    name = "contract"
    model, example = _tiny_onnx(tmp_path / "m.onnx", 0)
    versions = []
    for step in (0, 1):
        with mlflow.start_run():
            registration = register_onnx(tmp_path / "m.onnx", name, example, _card(0.8 + step / 100))
        versions.append(registration.version)
        assert client.get_run(registration.run_id).data.tags[REGISTERED_TAG] == registration.version, \
            "the run records that its alias moved"
        assert registration.model_uri == f"models:/{name}@{CHALLENGER}" and registration.tracking_uri == uri
    assert versions == ["1", "2"]
    latest = client.get_model_version_by_alias(name, CHALLENGER)
    assert str(latest.version) == "2", "the newest version takes the challenger alias"
    assert set(VERSION_TAG_KEYS) | {"dense_acc"} <= set(latest.tags)
    assert latest.tags["dataset"] == "toy" and json.loads(latest.tags["class_names"]) == ["a", "b", "c"]
    assert float(latest.tags["acc"]) == pytest.approx(0.81)

    loaded = mlflow.onnx.load_model(f"models:/{name}@{CHALLENGER}")
    session = ort.InferenceSession(loaded.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 1, 2, 3)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-5)
    signature = mlflow.models.get_model_info(f"models:/{name}@{CHALLENGER}").signature
    assert list(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 2, 3]
    assert {p.key: json.loads(p.value) for p in loaded.metadata_props}["dataset"] == "toy"


def test_register_onnx_needs_an_active_run(tmp_path, registry):
    _, example = _tiny_onnx(tmp_path / "m.onnx", 0)
    with pytest.raises(RuntimeError, match="active MLflow run"):
        register_onnx(tmp_path / "m.onnx", "no-run", example, {})


def test_a_failed_alias_move_takes_the_new_version_back(registry, tmp_path, monkeypatch):
    uri, client = registry
    _tiny_onnx(tmp_path / "m.onnx", 0)

    def refuse(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("503 Service Unavailable", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(RegistryError, match="MLflow refused to register .* as 'half-registered': 503"):
        register_run(tmp_path / "m.onnx", "half-registered", None, _card(0.8), experiment="half", metrics={})
    assert client.search_model_versions("name='half-registered'") == [], "no version without its alias"
    run = client.search_runs([mlflow.get_experiment_by_name("half").experiment_id])[0]
    assert run.info.status == "FAILED"


def test_promote_refuses_a_version_whose_registration_did_not_complete(registry):
    uri, client = registry
    name = "gated-incomplete"
    client.create_registered_model(name)
    with mlflow.start_run() as run:
        tags = {"acc": "0.9", "cwv": "0.01", "dense_acc": "0.9"}
        version = str(client.create_model_version(name, "file:///tmp/ballot-test-model", run_id=run.info.run_id,
                                                  tags=tags).version)
        with pytest.raises(PromotionError, match=f"version {version} comes from run .*, which is RUNNING"):
            promote(client, name, version, CFG)
    client.set_terminated(run.info.run_id, status="FAILED")
    with pytest.raises(PromotionError, match="which is FAILED and never moved an alias to it: its registration did "
                                             "not complete .*; register the model again"):
        promote(client, name, version, CFG)
    assert client.get_registered_model(name).aliases == {}
    with pytest.raises(ModelSourceError, match=f"version {version}.*which is FAILED .*; serve another version"):
        with fetch_model(f"models:/{name}/{version}", uri):
            pass


def test_serving_by_version_number_takes_a_complete_registration(registry, tmp_path):
    uri, client = registry
    _tiny_onnx(tmp_path / "m.onnx", 0)
    done = register_run(tmp_path / "m.onnx", "served-by-number", None, _card(0.8), experiment="tests", metrics={})
    with fetch_model(f"models:/served-by-number/{done.version}", uri) as source:
        assert source.version == done.version and source.path.is_file()


def test_a_run_whose_pid_was_reused_by_another_process_is_an_orphan(registry):
    import socket

    from ballot.storage import process_start

    uri, client = registry
    experiment = client.create_experiment("pid-reuse")
    me, host = os.getpid(), socket.gethostname()
    own = {"ballot.host": host, "ballot.pid": str(me), "ballot.pid_start": process_start(me)}
    live = client.create_run(experiment, tags=own).info.run_id
    reused = client.create_run(experiment, tags={**own, "ballot.pid_start": "1"}).info.run_id  # same pid, other start
    other_host = client.create_run(experiment, tags={**own, "ballot.host": f"not-{host}", "ballot.pid_start": "1"})
    assert fail_orphan_runs() == [reused]
    assert client.get_run(reused).info.status == "FAILED"
    assert {client.get_run(r).info.status for r in (live, other_host.info.run_id)} == {"RUNNING"}


def test_a_register_killed_after_its_alias_moved_ends_finished_and_stays_promotable(registry):
    import socket

    uri, client = registry
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    experiment = client.create_experiment("killed-late")
    run = client.create_run(experiment, tags={"ballot.host": socket.gethostname(), "ballot.pid": str(dead.pid)})
    client.create_registered_model("late")
    tags = {"acc": "0.9", "cwv": "0.01", "dense_acc": "0.9"}
    version = client.create_model_version("late", "file:///tmp/ballot-test-model", run_id=run.info.run_id, tags=tags)
    client.set_registered_model_alias("late", CHALLENGER, version.version)  # then the process died
    assert promote(client, "late", str(version.version), CFG).promoted, "its alias says it is whole: still RUNNING"
    assert fail_orphan_runs() == [run.info.run_id]
    assert client.get_run(run.info.run_id).info.status == "FINISHED", "its registration was complete"
    assert promote(client, "late", str(version.version), CFG).promoted


@pytest.mark.parametrize("recorded", [True, False], ids=["killed after its alias moved", "killed before"])
def test_the_next_register_anywhere_ends_a_killed_one_by_what_its_run_recorded(registry, tmp_path, recorded):
    """A register killed in one experiment, whose version has since lost the alias to a newer one: a register in
    another experiment keeps the version when its run recorded the alias move, and deletes it when not."""
    uri, client = registry
    name = f"moved-on-{recorded}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"ballot.host": socket.gethostname(), "ballot.pid": str(dead.pid)}
    run = client.create_run(client.create_experiment(f"home-{recorded}"), tags=owner)
    client.create_registered_model(name)
    tags = {"acc": "0.9", "cwv": "0.01", "dense_acc": "0.9"}
    killed = client.create_model_version(name, "file:///tmp/ballot-test-model", run_id=run.info.run_id, tags=tags)
    if recorded:
        client.set_registered_model_alias(name, CHALLENGER, killed.version)
        client.set_tag(run.info.run_id, REGISTERED_TAG, str(killed.version))  # then the process died
    newer = client.create_model_version(name, "file:///tmp/ballot-test-model", tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, newer.version)
    _tiny_onnx(tmp_path / "m.onnx", 0)
    register_run(tmp_path / "m.onnx", f"bystander-{recorded}", None, _card(0.8), experiment=f"away-{recorded}",
                 metrics={})
    assert client.get_run(run.info.run_id).info.status == ("FINISHED" if recorded else "FAILED")
    left = {str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
    assert left == ({str(killed.version), str(newer.version)} if recorded else {str(newer.version)})


CFG = PromoteConfig(max_acc_drop=0.02, cwv_tolerance=1.0)


@pytest.mark.parametrize("acc, passed", [(0.89, True), (0.88, True), (0.879, False), (0.95, True)])
def test_accuracy_gate_without_a_champion(acc, passed):
    ok, reasons = gate({"acc": str(acc), "dense_acc": "0.9", "cwv": "0.5"}, None, CFG)
    assert ok is passed
    assert "no current champion" in reasons[-1]


@pytest.mark.parametrize("cwv, tolerance, passed", [(0.010, 1.0, True), (0.011, 1.0, False), (0.011, 1.2, True)])
def test_cwv_gate_against_the_champion(cwv, tolerance, passed):
    cfg = PromoteConfig(max_acc_drop=0.02, cwv_tolerance=tolerance)
    ok, reasons = gate({"acc": "0.9", "dense_acc": "0.9", "cwv": str(cwv)}, {"cwv": "0.010"}, cfg)
    assert ok is passed
    assert ("less fair than allowed" in reasons[-1]) is not passed


def test_gate_names_a_missing_or_bad_tag():
    with pytest.raises(PromotionError, match="no 'dense_acc' tag"):
        gate({"acc": "0.9", "cwv": "0.1"}, None, CFG)
    with pytest.raises(PromotionError, match="'cwv' is not a number"):
        gate({"acc": "0.9", "dense_acc": "0.9", "cwv": "n/a"}, {"cwv": "0.1"}, CFG)


def _version(client, name: str, acc: float, cwv: float, dense_acc: float = 0.9, source: str = "") -> str:
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    tags = {"acc": str(acc), "cwv": str(cwv), "dense_acc": str(dense_acc)}
    return str(client.create_model_version(name, source or "file:///tmp/ballot-test-model", tags=tags).version)


def test_promote_command_moves_champion_only_through_the_gate(registry, tmp_path, capsys, monkeypatch):
    uri, client = registry
    monkeypatch.chdir(tmp_path)  # no params.yaml here: built-in promote defaults
    name = "gated"
    first = _version(client, name, acc=0.89, cwv=0.010)
    unfair = _version(client, name, acc=0.90, cwv=0.012)
    inaccurate = _version(client, name, acc=0.80, cwv=0.001)
    fairer = _version(client, name, acc=0.885, cwv=0.008)

    def promote(version: str, *flags: str) -> tuple[int, str]:
        code = main(["promote", "--name", name, "--version", version, "--tracking-uri", uri, *flags])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    code, out = promote(first)
    assert code == 0 and "no current champion" in out
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == first

    code, out = promote(unfair)
    assert code == 1 and "refused" in out and "less fair than allowed" in out
    code, out = promote(inaccurate)
    assert code == 1 and "too large a drop" in out
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == first, "a refusal changes nothing"

    code, out = promote(unfair, "--cwv-tolerance", "1.5")
    assert code == 0 and str(client.get_model_version_by_alias(name, CHAMPION).version) == unfair
    code, out = promote(fairer)
    assert code == 0 and f"was version {unfair}" in out
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == fairer


def test_a_registry_error_reading_the_champion_stops_the_gate(registry):
    """A failed read of the aliases (a server's timeout or 5xx) is not "no champion": that would skip the CWV check."""
    uri, client = registry
    name = "gated-flaky"
    champion = _version(client, name, acc=0.89, cwv=0.010)
    client.set_registered_model_alias(name, CHAMPION, champion)
    unfair = _version(client, name, acc=0.90, cwv=0.050)

    class FlakyRegistry(mlflow.MlflowClient):  # reads of the model and its aliases fail; versions still read
        def get_registered_model(self, *args, **kwargs):
            raise mlflow.exceptions.MlflowException("503 Service Unavailable", error_code="TEMPORARILY_UNAVAILABLE")

        get_model_version_by_alias = get_registered_model

    with pytest.raises(PromotionError, match="cannot read @champion of model 'gated-flaky'.*503"):
        promote(FlakyRegistry(tracking_uri=uri, registry_uri=uri), name, unfair, CFG)
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == champion


@pytest.mark.parametrize("args, message", [
    (["--name", "absent", "--version", "1"], "model 'absent' has no version '1'"),
    (["--name", "gated-usage", "--version", "1", "--max-acc-drop", "-1"], "promote.max_acc_drop: must be in"),
])
def test_promote_usage_errors_exit_2(registry, tmp_path, capsys, monkeypatch, args, message):
    uri, _ = registry
    monkeypatch.chdir(tmp_path)
    assert main(["promote", "--tracking-uri", uri, *args]) == 2
    assert message in capsys.readouterr().err


def test_promote_a_version_without_pipeline_tags_is_a_usage_error(registry, tmp_path, capsys, monkeypatch):
    uri, client = registry
    monkeypatch.chdir(tmp_path)
    client.create_registered_model("untagged")
    version = str(client.create_model_version("untagged", "file:///tmp/ballot-test-model").version)
    assert main(["promote", "--name", "untagged", "--version", version, "--tracking-uri", uri]) == 2
    assert "has no 'acc' tag" in capsys.readouterr().err


def test_a_tracking_file_that_is_not_sqlite_is_named(tmp_path):
    junk = tmp_path / "mlflow.db"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(StorageError, match="is not an SQLite database"):
        connect(f"sqlite:///{junk}")


@pytest.mark.parametrize("uri", ["./mlruns", "mlruns", "file://{tmp}/mlruns"])
def test_a_file_store_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, uri):
    """MLflow 3 refuses its filesystem store with a trace from inside the client: register and promote name it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    _tiny_onnx(tmp_path / "m.onnx", 0)
    uri = uri.format(tmp=tmp_path)
    for command in (["register", "--onnx", "m.onnx", "--tracking-uri", uri], ["promote", "--name", "m", "--version",
                                                                              "1", "--tracking-uri", uri]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == f"ballot: error: tracking URI '{uri}' is a file store, which MLflow 3 no longer supports " \
                      "here: use sqlite:///path/to/mlflow.db or an http(s):// tracking server\n"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["promote", "--name", "m", "--version", "1"]) == 2
    assert "is a file store" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.onnx"], "nothing written"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out still opts out
    check_store(uri)


@pytest.mark.parametrize("uri", ["databricks", "databricks://profile", "sqlite:///mlflow.db", "http://127.0.0.1:5000"])
def test_stores_that_are_not_paths_pass_the_file_store_check(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    check_store(uri)


def _closed_port() -> int:
    """A local port nothing listens on (bound, noted, closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("command", [["promote", "--name", "tiny-digits", "--version", "1"],
                                     ["register", "--onnx", "m.onnx"]])
def test_an_unreachable_tracking_server_is_named_in_one_line(tmp_path, command):
    """MLflow alone retries an unreachable server for about four minutes; promote then called it a missing version."""
    export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).eval(), (1, 2, 3), tmp_path / "m.onnx", _card(0.8))
    uri = f"http://127.0.0.1:{_closed_port()}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), MLFLOW_DISABLE_TELEMETRY="true")
    done = subprocess.run([sys.executable, "-m", "ballot.cli", *command, "--tracking-uri", uri], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=150)
    assert (done.returncode, done.stderr) == (2, f"ballot: error: cannot reach the tracking server {uri}: "
                                                 "Connection refused\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.onnx"]


def test_a_tracking_server_that_does_not_answer_is_named(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(StorageError) as raised:
            check_server(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri, timeout_s=1)
    assert str(raised.value) == f"cannot reach the tracking server {uri}: no answer within 1 s"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ, "the probe's limits end with it"


def test_promote_tells_a_registry_failure_from_a_missing_version(registry):
    uri, _ = registry

    class Unavailable(mlflow.MlflowClient):
        def get_model_version(self, *args, **kwargs):
            raise mlflow.exceptions.MlflowException("API request failed: 503", error_code="TEMPORARILY_UNAVAILABLE")

    with pytest.raises(PromotionError) as raised:
        promote(Unavailable(tracking_uri=uri, registry_uri=uri), "some-model", "1", CFG)
    assert str(raised.value) == "cannot read version '1' of model 'some-model' from the registry: API request " \
                                "failed: 503"


KILLED_REGISTER = """
import os, signal, sys
import mlflow
from ballot import tracking
from tests.test_tracking import _card, _tiny_onnx

uri, onnx_path, mode = sys.argv[1:]
tracking.connect(uri)
_tiny_onnx(onnx_path, seed=1 if mode == "kill" else 0)
if mode == "kill":  # SIGKILL at the point where the version exists and the alias has not moved yet
    mlflow.MlflowClient.set_registered_model_alias = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
reg = tracking.register_run(onnx_path, "killed-model", None, _card(0.5), experiment="killed", metrics={"acc": 0.5})
print(reg.version)
"""


@pytest.mark.slow
def test_a_register_killed_after_creating_the_version_leaves_the_registry_consistent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = tmp_path / "register.py"
    script.write_text(KILLED_REGISTER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MLFLOW_DISABLE_TELEMETRY": "true"}

    def register(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), uri, str(tmp_path / f"{mode}.onnx"), mode], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)

    first = register("ok")
    assert first.returncode == 0, first.stderr
    killed = register("kill")
    assert killed.returncode == -signal.SIGKILL
    client = connect(uri)
    versions = sorted(client.search_model_versions("name='killed-model'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert all(set(VERSION_TAG_KEYS) <= set(v.tags) for v in versions), "no version is missing its tags"
    assert str(client.get_model_version_by_alias("killed-model", CHALLENGER).version) == "1", "the alias did not move"
    orphan = client.get_run(versions[1].run_id)
    assert orphan.info.status == "RUNNING"
    again = register("ok")
    assert again.returncode == 0, again.stderr
    assert client.get_run(versions[1].run_id).info.status == "FAILED", "the next run ends the orphan as FAILED"
    assert str(client.get_model_version_by_alias("killed-model", CHALLENGER).version) == again.stdout.split()[-1] == "3"
    left = sorted(str(v.version) for v in client.search_model_versions("name='killed-model'"))
    assert left == ["1", "3"], "the orphan's alias-less version is deleted with it"


@pytest.mark.slow
def test_two_registers_of_one_model_at_once_each_leave_a_complete_version(tmp_path):
    """Two `ballot register` processes of one model started together: each creates its own version, both complete
    (their runs finished) and promotable, and the alias ends on the one that moved it last."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    onnx_path = tmp_path / "model.onnx"
    export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).eval(), (1, 2, 3), onnx_path, _card(0.8))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "ballot.cli", "register", "--onnx", str(onnx_path), "--name", "twice",
               "--tracking-uri", uri]
    both = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in both]
    assert [process.returncode for process in both] == [0, 0], [error for _, error in outputs]
    printed = sorted(out.split("version ")[1].split()[0] for out, _ in outputs)
    assert printed == ["1", "2"]
    client = connect(uri)
    versions = [client.get_model_version("twice", number) for number in printed]
    assert all(client.get_run(v.run_id).info.status == "FINISHED" for v in versions)
    assert [incomplete_reason(client, v) for v in versions] == [None, None]
    assert str(client.get_model_version_by_alias("twice", CHALLENGER).version) in printed
