"""Fast checks of the pipeline's pieces: params.yaml, dvc.yaml, the snapshot, replace-on-success folders."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from ballot.config import ExperimentConfig, load_yaml
from ballot.errors import ConfigError, StorageError, UnknownMethodError
from ballot.snapshot import load_snapshot, save_snapshot
from ballot import model_card
from ballot.storage import atomic_save_tensors, staged_folder, write_json, write_text
from ballot.tuning.study import SEARCH_KEYS, TRIAL_PRUNE_KEYS
from pipelines.common import load_config, run_stage
from pipelines.evaluate import summarise

REPO = Path(__file__).resolve().parents[1]
# params.yaml departs from the dataclass defaults only here, each for a documented reason.
DOCUMENTED_DEPARTURES = {"data.imbalance_ratio": 10.0, "tune.n_trials": 4}


def leaves(config: object, prefix: str = "") -> dict[str, object]:
    """{dotted field path: value} down to the fields that are not themselves config dataclasses."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(leaves(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def test_params_yaml_lists_every_field_at_its_default_but_for_documented_departures():
    raw = load_yaml(REPO / "params.yaml")
    given, defaults = leaves(load_config(REPO / "params.yaml")), leaves(ExperimentConfig())

    def listed(path: str) -> bool:
        node = raw
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = sorted(path for path in defaults if not listed(path))
    assert not missing, f"params.yaml must list every config field; missing {missing}"
    differing = {key: value for key, value in given.items() if value != defaults[key]}
    assert differing == DOCUMENTED_DEPARTURES


def test_every_stage_lists_its_script_and_only_params_that_exist():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    keys = leaves(ExperimentConfig())
    for name, stage in pipeline["stages"].items():
        assert stage["cmd"] == f"python -m pipelines.{name}"
        assert f"pipelines/{name}.py" in stage["deps"] and "pipelines/common.py" in stage["deps"]
        for param in stage["params"]:
            assert any(k == param or k.startswith(param + ".") for k in keys), f"{name}: unknown param {param}"
    dense_params = pipeline["stages"]["train_dense"]["params"]
    assert "base.density" not in dense_params and not any(p.startswith("prune") for p in dense_params)
    read_by_trials = {f"prune.{key}" for key in TRIAL_PRUNE_KEYS} | {f"tune.{key}" for key in SEARCH_KEYS}
    assert read_by_trials <= set(pipeline["stages"]["tune"]["params"]), "a setting trials read must re-run tune"


# Modules every stage reads only for plumbing (settings, errors, file writes): listing them would re-run the whole
# pipeline on any change to them, and none of them decides a result.
PLUMBING = {"ballot.config", "ballot.errors", "ballot.storage"}


def _ballot_imports(script: Path) -> set[str]:
    """The ballot modules a stage script imports by name (``from ballot.x import ...``, ``from ballot import x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "ballot":
            found |= {f"ballot.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ballot."):
            found.add(node.module)
    return found


def test_every_ballot_module_a_stage_script_imports_is_one_of_its_deps():
    """Else a change to that module leaves the stage's outputs stale (DVC skips a stage whose deps did not change)."""
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        folders = [dep for dep in stage["deps"] if (REPO / dep).is_dir()]
        for module in sorted(_ballot_imports(REPO / "pipelines" / f"{name}.py") - PLUMBING):
            path = module.replace(".", "/")
            listed = f"{path}.py" in stage["deps"] or any(path == f or path.startswith(f"{f}/") for f in folders)
            assert listed, f"stage {name} imports {module} but dvc.yaml does not list it among its deps"
        scripts = [dep for dep in stage["deps"] if dep.startswith("pipelines/")]
        assert set(scripts) <= {f"pipelines/{name}.py", "pipelines/common.py"}, f"{name}: lists another stage's script"


@pytest.mark.parametrize("text, error, message", [
    ("bogus: {}\n", ConfigError, r"unknown group\(s\) \['bogus'\]"),
    ("export: {parity_samples: 0}\n", ConfigError, "export.parity_samples: must be positive"),
    ("register: {model_name: ' '}\n", ConfigError, "register.model_name: must not be empty"),
    ("prune: {method: prayer}\n", UnknownMethodError, "unknown pruning method 'prayer'"),
    ("base: {device: gpu0}\n", ConfigError, "base.device: "),
    ("prune: {method: magnitude, granularity: unit}\nsweep: {densities: [0.2], methods: [ballot, lth]}\n",
     ConfigError, r"sweep.methods\[1\]: 'lth' does not fit the prune settings \(prune.granularity: 'unit'"),
])
def test_load_config_names_the_problem(tmp_path, text, error, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(error, match=message):
        load_config(path)


def test_unit_granularity_loads_while_the_sweep_is_off(tmp_path):
    """The sweep's methods are checked against the prune settings only when the sweep has densities to run."""
    path = tmp_path / "params.yaml"
    path.write_text("prune: {method: magnitude, granularity: unit}\nsweep: {densities: [], methods: [ballot, lth]}\n")
    assert load_config(path).prune.granularity == "unit"


def test_run_stage_validates_before_the_body_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("base: {density: 1.5}\n")
    called = []
    with pytest.raises(SystemExit) as stop:
        run_stage("prune", called.append)
    assert stop.value.code == 2 and not called
    assert "prune: error: base.density: must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_an_interrupted_stage_says_so_in_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("base: {density: 0.5}\n")

    def interrupted(cfg):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        run_stage("tune", interrupted)
    assert stop.value.code == 130 and capsys.readouterr().err == "tune: interrupted\n"


def test_staged_folder_replaces_the_whole_folder_only_on_success(tmp_path):
    final = tmp_path / "out"
    with staged_folder(final) as folder:
        write_json(folder / "a.json", 1)
        write_json(folder / "stale.json", 2)
    with staged_folder(final) as folder:
        write_json(folder / "a.json", 3)
    assert sorted(p.name for p in final.iterdir()) == ["a.json"] and (final / "a.json").read_text() == "3\n"
    with pytest.raises(RuntimeError):
        with staged_folder(final) as folder:
            write_json(folder / "a.json", 4)
            raise RuntimeError("stage failed")
    assert sorted(p.name for p in final.iterdir()) == ["a.json"] and (final / "a.json").read_text() == "3\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temp folder is left behind"


def test_staged_folder_gets_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        with staged_folder(tmp_path / "out"):
            pass
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755, "not mkdtemp's 0700"


def test_snapshot_round_trip_keeps_every_tensor(tmp_path, tiny_data):
    save_snapshot(tiny_data, tmp_path, {"dataset": "digits"})
    loaded = load_snapshot(tmp_path)
    for split in ("train", "val", "test"):
        original, again = getattr(tiny_data, split), getattr(loaded, split)
        assert torch.equal(original.x, again.x) and torch.equal(original.y, again.y)
    assert torch.equal(loaded.train_index, tiny_data.train_index) and torch.equal(loaded.val_index, tiny_data.val_index)
    assert loaded.class_names == tiny_data.class_names and loaded.input_shape == tiny_data.input_shape
    summary = load_yaml(tmp_path / "summary.json")  # JSON is YAML
    assert summary["dataset"] == "digits" and sum(summary["class_counts"]["test"]) == len(tiny_data.test)


def test_snapshot_errors_name_the_file(tmp_path, tiny_data):
    with pytest.raises(StorageError, match="has no summary.json"):
        load_snapshot(tmp_path)
    save_snapshot(tiny_data, tmp_path)
    atomic_save_tensors({"x": tiny_data.test.x, "y": tiny_data.test.y + 10}, tmp_path / "test.safetensors")
    with pytest.raises(StorageError, match=r"test.safetensors': labels outside \[0, 10\)"):
        load_snapshot(tmp_path)
    atomic_save_tensors({"x": tiny_data.test.x.double(), "y": tiny_data.test.y}, tmp_path / "test.safetensors")
    with pytest.raises(StorageError, match="x must be float32 with a sample dimension"):
        load_snapshot(tmp_path)
    atomic_save_tensors({"x": tiny_data.test.x, "y": tiny_data.test.y.float()}, tmp_path / "test.safetensors")
    with pytest.raises(StorageError, match="y must be a one-dimensional int64 tensor, is torch.float32"):
        load_snapshot(tmp_path)
    atomic_save_tensors({"x": tiny_data.test.x, "y": tiny_data.test.y}, tmp_path / "test.safetensors")
    (tmp_path / "val.safetensors").unlink()
    with pytest.raises(StorageError, match="val.safetensors' not found"):
        load_snapshot(tmp_path)
    for summary, message in ((b"\xff\xfe binary", "is not valid JSON"), (b'{"class_names": "abc"}', "non-empty list")):
        (tmp_path / "summary.json").write_bytes(summary)
        with pytest.raises(StorageError, match=message):
            load_snapshot(tmp_path)


def test_metrics_summary_reports_density_from_the_mask_and_classes_by_name():
    per_class = [0.5, 1.0, 0.75]
    sparse = {"acc": 0.75, "cwv": 0.04, "mcd": 0.5, "worst_class": 0.5, "worst_class_index": 0,
              "per_class": per_class, "class_names": ["a", "b", "c"],
              "val": {"acc": 0.7, "cwv": 0.1, "mcd": 0.6, "worst_class": 0.4}}
    dense = {"acc": 0.8, "cwv": 0.02, "mcd": 0.3, "worst_class": 0.6, "per_class": [0.6, 0.9, 0.9]}
    metrics = summarise(sparse, dense, kept=25, total=1000)
    assert metrics["density"] == 0.025 and metrics["kept_weights"] == 25
    assert metrics["per_class"] == {"a": 0.5, "b": 1.0, "c": 0.75} and metrics["worst_class_name"] == "a"
    assert metrics["dense"]["acc"] == 0.8 and metrics["val"]["mcd"] == 0.6
    assert "per_group" not in metrics and "group_gap" not in metrics["dense"]


def test_metrics_summary_carries_the_group_gaps_when_the_data_has_a_sensitive_attribute():
    group = {"per_group": {0: 0.9, 1: 0.6}, "group_var": 0.0225, "group_gap": 0.3, "worst_group": 0.6}
    sparse = {"acc": 0.75, "cwv": 0.04, "mcd": 0.5, "worst_class": 0.5, "worst_class_index": 0, **group,
              "per_class": [0.5, 1.0], "class_names": ["a", "b"],
              "val": {"acc": 0.7, "cwv": 0.1, "mcd": 0.6, "worst_class": 0.4, **group, "group_gap": 0.2}}
    dense = {"acc": 0.8, "cwv": 0.02, "mcd": 0.3, "worst_class": 0.6, **group, "group_gap": 0.1}
    metrics = summarise(sparse, dense, kept=25, total=1000)
    assert metrics["per_group"] == {0: 0.9, 1: 0.6} and metrics["group_gap"] == 0.3
    assert metrics["dense"]["group_gap"] == 0.1 and metrics["val"]["group_gap"] == 0.2


def test_tune_stage_refuses_an_external_storage(tmp_path, monkeypatch, capsys):
    import pipelines.tune

    monkeypatch.chdir(tmp_path)
    params = load_yaml(Path(__file__).resolve().parents[1] / "params.yaml")
    params["tune"]["storage"] = "postgresql://u@127.0.0.1:5/db"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as stop:
        run_stage("tune", pipelines.tune.main)
    assert stop.value.code == 2
    assert "tune.storage: the pipeline's tune stage keeps its study in" in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists()


def test_tune_stage_skips_the_study_for_another_method_and_keeps_an_earlier_study(tmp_path, monkeypatch, capsys):
    import pipelines.tune

    monkeypatch.chdir(tmp_path)
    params = load_yaml(Path(__file__).resolve().parents[1] / "params.yaml")
    params["prune"]["method"], params["prune"]["granularity"] = "magnitude", "unit"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    kept = tmp_path / "artifacts" / "tune" / "chosen" / "trial-3"
    kept.mkdir(parents=True)
    (tmp_path / "artifacts" / "tune" / "study.db").write_bytes(b"an earlier study")
    run_stage("tune", pipelines.tune.main)
    reason = "prune.method is 'magnitude' and the sweep draws no Ballot curve; the study tunes Ballot"
    assert f"tune: skipped ({reason})" in capsys.readouterr().out
    assert load_yaml(tmp_path / "best_params.yaml") == {"skipped": reason, "params": {}}
    assert json.loads((tmp_path / "artifacts" / "tune" / "report" / "summary.json").read_text()) == {"skipped": reason}
    assert kept.is_dir() and (tmp_path / "artifacts" / "tune" / "study.db").read_bytes() == b"an earlier study"

    params["prune"]["granularity"] = "weight"
    params["sweep"] = {"densities": [0.2], "methods": ["magnitude", "ballot"]}  # a tuned Ballot curve
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(pipelines.tune, "load_snapshot", lambda folder: (_ for _ in ()).throw(LookupError("studied")))
    with pytest.raises(LookupError, match="studied"):
        run_stage("tune", pipelines.tune.main)


def _stage_inputs(seed: int) -> None:
    """In the working folder, the files the register stage reads, for a tiny linear model exported with ``seed``."""
    from ballot.export import export_onnx

    torch.manual_seed(seed)
    card = {"density": 0.5, "acc": 0.8, "cwv": 0.01, "mcd": 0.2, "worst_class": 0.6, "dataset": "toy",
            "method": "lth", "model": "linear", "class_names": ["a", "b", "c"], "input_shape": [1, 2, 3],
            "dense_acc": 0.9}
    model_file = export_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3)).eval(), (1, 2, 3),
                             "artifacts/export/model.onnx", card)
    atomic_save_tensors({"input": torch.rand(1, 1, 2, 3)}, "artifacts/export/input_example.safetensors")
    write_json("artifacts/export/export.json", {"onnx_bytes": model_file.stat().st_size})
    write_json("metrics.json", {key: card[key] for key in ("density", "acc", "cwv", "mcd", "worst_class")})
    per_class = [{"class": c, "sparse": 0.8, "dense": 0.9, "test_samples": 3} for c in "abc"]
    write_json("plots/per_class.json", per_class)
    write_text("artifacts/export/model_card.md", model_card.render(card, per_class, model_file.stat().st_size))
    write_json("artifacts/prune/metrics.json", {"method": "lth"})
    write_json("artifacts/prune/config.json", {"prune": {"method": "lth"}})
    for folder in ("dense", "prune"):
        write_json(f"artifacts/{folder}/history.json", [])


@pytest.fixture()
def register_folder(tmp_path, monkeypatch):
    """A working folder holding the register stage's inputs (seed 0) and its own tracking store; yields mlflow."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    for folder in ("artifacts/export", "artifacts/prune", "artifacts/dense", "plots"):
        Path(folder).mkdir(parents=True)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # a client made in the test, too, reaches this store, whatever an earlier test set
    mlflow.set_registry_uri(uri)
    _stage_inputs(seed=0)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def test_the_summary_reports_a_registration_only_for_the_model_it_registered(register_folder, capsys):
    """register.json persists through a failed register stage: after a new export it names another model."""
    import pipelines.register
    import pipelines.summary
    from ballot.tracking import file_sha256

    pipelines.register.main(ExperimentConfig())
    written = load_yaml(Path("artifacts/register.json"))
    assert written["onnx_sha256"] == file_sha256("artifacts/export/model.onnx") and written["version"] == "1"
    capsys.readouterr()
    assert pipelines.summary.main() == 0
    assert capsys.readouterr().out.splitlines()[-1] == "registered   ballot-fashion-mnist version 1 @challenger"
    client, name = register_folder.MlflowClient(), written["name"]
    first = client.get_model_version(name, "1")
    client.create_model_version(name, first.source, run_id=first.run_id)  # another registration moves the alias
    client.set_registered_model_alias(name, "challenger", "2")
    assert pipelines.summary.main() == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("registered   ballot-fashion-mnist version 1 @challenger "
                                                        "(@challenger now points to version 2)")
    client.delete_registered_model_alias(name, "challenger")
    assert pipelines.summary.main() == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("@challenger (the registry has no @challenger now)")
    client.set_registered_model_alias(name, "challenger", "1")
    _stage_inputs(seed=1)  # prune, evaluate and export ran again; register failed (or has not run yet)
    assert pipelines.summary.main() == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("registered   not this model (register.json names version 1 "
                                                        "of an earlier export; run the register stage)")


def test_the_register_stage_registers_a_model_that_has_versions_but_no_challenger_yet(register_folder, capsys):
    """MLflow answers a missing alias of an existing model with another error code than a missing model."""
    import pipelines.register

    name = ExperimentConfig().register.model_name
    register_folder.MlflowClient().create_registered_model(name)
    pipelines.register.main(ExperimentConfig())
    assert load_yaml(Path("artifacts/register.json"))["version"] == "1"
    assert "@challenger" in capsys.readouterr().out


def test_a_register_stage_killed_before_recording_is_recorded_by_the_next_not_registered_twice(register_folder,
                                                                                                capsys):
    import pipelines.register

    name = ExperimentConfig().register.model_name
    pipelines.register.main(ExperimentConfig())
    Path("artifacts/register.json").unlink()  # as if killed after its run ended, before the file was written
    Path("artifacts/model_card.md").unlink()
    capsys.readouterr()
    pipelines.register.main(ExperimentConfig())
    assert "register: version 1 (run " in capsys.readouterr().err
    versions = register_folder.MlflowClient().search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == ["1"], "not registered twice"
    assert load_yaml(Path("artifacts/register.json"))["version"] == "1"
    assert Path("artifacts/model_card.md").is_file()
    _stage_inputs(seed=1)  # another model: registered anew
    pipelines.register.main(ExperimentConfig())
    assert load_yaml(Path("artifacts/register.json"))["version"] == "2"
