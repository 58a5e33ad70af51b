"""The real pipeline: `dvc repro` on tiny digits settings in a temp copy of the project, then its outputs,
its registry entry, its caching behaviour and its handling of bad params."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ballot.config import apply_overrides, load_yaml
from ballot.masks import Mask, budget
from tests.conftest import TINY

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("prepare", "train_dense", "tune", "sweep", "prune", "evaluate", "export", "register")
MODEL_NAME = "ballot-e2e"


class Project:
    """A temp git + DVC repository holding a copy of the pipeline and the library."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test",
                    "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
                    "GIT_COMMITTER_EMAIL": "test@example.com"}
        self.env.pop("MLFLOW_TRACKING_URI", None)  # the params' default (sqlite:///mlflow.db here) must apply
        self.commit = ""  # the commit the pipeline ran on

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "dvc"), *args, check=check)

    def json(self, path: str):
        return json.loads((self.root / path).read_text())

    def params(self) -> dict:
        return load_yaml(self.root / "params.yaml")

    def write_params(self, params: dict) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def output_hashes(self) -> dict[str, str]:
        """SHA-256 of every pipeline output file (and dvc.lock)."""
        files = [self.root / "dvc.lock", self.root / "metrics.json"]
        for folder in ("artifacts", "plots"):
            files += [p for p in (self.root / folder).rglob("*") if p.is_file()]
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}

    def restore(self) -> None:
        """Back to the committed run: params, dvc.lock and the git-tracked (uncached) outputs, then DVC's outputs."""
        self.run("git", "checkout", "--", ".")
        self.dvc("checkout", "--force")

    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    if not (BIN / "dvc").is_file():
        pytest.skip(f"dvc is not installed next to {sys.executable}")
    root = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for package in ("ballot", "pipelines"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / ".gitignore").write_text("/mlflow.db\n/mlruns/\n__pycache__/\n")
    project = Project(root)
    params = apply_overrides(load_yaml(REPO / "params.yaml"), TINY + [
        f"register.model_name={MODEL_NAME}", "export.parity_samples=200", "tune.n_trials=3"])
    project.write_params(params)
    project.run("git", "init", "-q")
    project.dvc("init", "-q")
    project.dvc("config", "core.analytics", "false")
    project.dvc("config", "core.autostage", "false")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "pipeline")
    project.commit = project.run("git", "rev-parse", "HEAD").stdout.strip()
    first = project.dvc("repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "pipeline run")
    return project


def test_outputs_hold_the_promised_metrics_mask_and_export(project):
    metrics = project.json("metrics.json")
    assert {"acc", "per_class", "cwv", "mcd", "worst_class", "density", "dense"} <= set(metrics)
    per_class = list(metrics["per_class"].values())
    assert list(metrics["per_class"]) == [str(d) for d in range(10)]
    assert metrics["cwv"] == pytest.approx(np.mean([(a - metrics["acc"]) ** 2 for a in per_class]))
    assert metrics["mcd"] == pytest.approx(max(per_class) - min(per_class))
    assert metrics["worst_class"] == min(per_class)
    assert 0 < metrics["dense"]["acc"] <= 1

    mask = Mask.load(project.root / "artifacts/prune/mask.safetensors")
    assert mask.kept == budget(mask.total, 0.1), "exactly the budget survives"
    chosen = project.json("artifacts/tune/report/summary.json")["best"]["number"]
    assert project.json("artifacts/prune/metrics.json")["reused_trial"] == chosen, "prune reused tune's model"
    assert [p.name for p in (project.root / "artifacts/tune/chosen").iterdir()] == [f"trial-{chosen}"]
    assert metrics["density"] == mask.kept / mask.total and metrics["kept_weights"] == mask.kept
    details = project.json("artifacts/prune/details.json")
    assert details["tuned_params"] == load_yaml(project.root / "best_params.yaml")["params"], "what prune applied"
    choice = details["final_choice"]  # refine_start 'best', the default
    assert set(choice["objectives"]) == {"refined from theta_k", "refined from theta_T"}
    assert choice["kept"] in choice["objectives"]

    export = project.json("artifacts/export/export.json")
    assert export["parity"]["max_abs_diff"] <= 1e-4 and export["parity"]["samples"] == 200
    assert export["onnx_bytes"] == (project.root / "artifacts/export/model.onnx").stat().st_size
    assert export["onnx_format"] == "compact" and export["onnx_bytes"] < 0.7 * export["dense_onnx_bytes"]
    from ballot.export import read_metadata

    card = read_metadata(project.root / "artifacts/export/model.onnx")
    assert card["acc"] == metrics["acc"] and card["density"] == metrics["density"]
    assert card["dataset"] == "digits" and card["method"] == "ballot" and card["input_shape"] == [1, 8, 8]
    assert card["onnx_format"] == "compact" and card["granularity"] == "weight" and card["quantization"] == "none"

    rows = project.json("plots/per_class.json")
    assert [r["sparse"] for r in rows] == per_class and (project.root / "plots/per_class.png").stat().st_size > 0
    shown = project.dvc("metrics", "show", "--json")
    assert json.loads(shown.stdout), "dvc metrics show reads the declared metrics"


def test_registered_challenger_predicts_like_the_exported_file(project):
    import mlflow
    import mlflow.onnx
    import onnxruntime as ort
    import torch

    from ballot.storage import load_tensors

    registration = project.json("artifacts/register.json")
    assert registration["name"] == MODEL_NAME and registration["alias"] == "challenger"
    mlflow.set_tracking_uri(project.tracking_uri())
    mlflow.set_registry_uri(project.tracking_uri())
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(version.version) == registration["version"]
    metrics = project.json("metrics.json")
    assert float(version.tags["acc"]) == metrics["acc"] and float(version.tags["cwv"]) == metrics["cwv"]
    assert float(version.tags["dense_acc"]) == metrics["dense"]["acc"]
    assert version.tags["method"] == "ballot" and json.loads(version.tags["class_names"]) == [str(d) for d in range(10)]

    x = load_tensors(project.root / "artifacts/data/test.safetensors")["x"].numpy()
    registered = mlflow.onnx.load_model(f"models:/{MODEL_NAME}@challenger")
    from_registry = ort.InferenceSession(registered.SerializeToString(), providers=["CPUExecutionProvider"])
    from_file = ort.InferenceSession(str(project.root / "artifacts/export/model.onnx"),
                                     providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(from_registry.run(None, {"input": x})[0], from_file.run(None, {"input": x})[0])
    assert torch.tensor(from_file.run(None, {"input": x})[0]).argmax(1).numel() == len(x)

    run = client.get_run(registration["run_id"])
    assert run.data.tags["git_commit"] == project.commit and len(run.data.tags["dvc_lock_sha256"]) == 64
    assert run.data.params["prune.method"] == "ballot" and run.data.metrics["acc"] == metrics["acc"]
    logged = {a.path for folder in ("plots", "prune", "model") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/per_class.json", "prune/mask_report.json", "model/model_card.md"} <= logged
    card = (project.root / "artifacts/model_card.md").read_text()
    assert "## Fairness caveats" in card and f"accuracy {metrics['acc']:.4f}" in card
    dense_curve = client.get_metric_history(run.info.run_id, "dense.train_loss")
    dense_epochs = len(project.json("artifacts/dense/history.json"))
    assert [m.step for m in dense_curve] == list(range(1, dense_epochs + 1)), "one point per dense epoch"
    assert len(client.get_metric_history(run.info.run_id, "final.train_acc")) == \
        len(project.json("artifacts/prune/history.json"))


def test_second_repro_is_a_no_op(project):
    before = project.output_hashes()
    result = project.dvc("repro")
    assert "Running stage" not in result.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout
    assert project.output_hashes() == before


def test_changing_prune_params_reruns_prune_not_train_dense(project):
    dense_before = {k: v for k, v in project.output_hashes().items() if k.startswith("artifacts/dense/")}
    try:
        status = project.dvc("status", "--json", "prune")
        assert json.loads(status.stdout) == {}
        result = project.dvc("exp", "run", "-S", "prune.method=lth", "prune")
        assert "Stage 'train_dense' didn't change, skipping" in result.stdout
        assert "Running stage 'prune'" in result.stdout and "Running stage 'train_dense'" not in result.stdout
        assert "rounds" in project.json("artifacts/prune/details.json"), "the LTH baseline ran"
        after = project.output_hashes()
        assert {k: v for k, v in after.items() if k.startswith("artifacts/dense/")} == dense_before
    finally:
        project.restore()
    assert json.loads(project.dvc("status", "--json").stdout) == {}


def test_the_kept_trial_folder_removed_by_hand_comes_back_empty_and_prune_trains_alike(project, tmp_path):
    before, chosen = project.output_hashes(), project.root / "artifacts" / "tune" / "chosen"
    shutil.copytree(chosen, tmp_path / "chosen")
    try:
        shutil.rmtree(chosen)
        result = project.dvc("repro")
        assert "Running stage 'tune'" in result.stdout and "Running stage 'prune'" in result.stdout
        assert list(chosen.iterdir()) == []
        assert project.output_hashes()["artifacts/prune/mask.safetensors"] == before["artifacts/prune/mask.safetensors"]
    finally:
        shutil.rmtree(chosen, ignore_errors=True)
        shutil.copytree(tmp_path / "chosen", chosen)  # not in DVC's cache (cache: false)
        project.restore()
    assert json.loads(project.dvc("status", "--json").stdout) == {}


def test_switching_the_method_back_restores_it_from_the_run_cache(project):
    metrics_before = project.output_hashes()["metrics.json"]
    method = project.params()["prune"]["method"]
    assert method != "lth"
    try:
        project.dvc("exp", "run", "-S", "prune.method=lth")
        back = project.dvc("exp", "run", "-S", f"prune.method={method}")
        assert "Stage 'prune' is cached - skipping run, checking out outputs" in back.stdout
        assert "Running stage 'prune'" not in back.stdout and "Running stage 'train_dense'" not in back.stdout
        assert project.output_hashes()["metrics.json"] == metrics_before
    finally:
        project.restore()
    assert json.loads(project.dvc("status", "--json").stdout) == {}


def test_the_density_sweep_draws_one_curve_per_method(project):
    from PIL import Image

    assert project.json("sweep/density_curve.json") == {"points": []}, "the sweep is off by default"
    shown = json.loads(project.dvc("plots", "show", "--json").stdout)
    assert not shown.get("errors"), f"off, every declared plot still loads: {shown.get('errors')}"
    try:
        result = project.dvc("exp", "run", "-S", "sweep.densities=[0.5,0.2]", "-S", "sweep.methods=[magnitude,lth]",
                             "sweep")
        assert "Running stage 'sweep'" in result.stdout and "Running stage 'train_dense'" not in result.stdout
        points = project.json("sweep/density_curve.json")["points"]
        assert sorted((p["method"], p["target_density"]) for p in points) == [
            ("lth", 0.2), ("lth", 0.5), ("magnitude", 0.2), ("magnitude", 0.5)]
        for point in points:
            assert point["density"] == pytest.approx(point["target_density"], abs=1e-3)
            assert 0 <= point["acc"] <= 1 and point["cwv"] >= 0
        for method in ("magnitude", "lth"):
            assert [r["density"] for r in project.json(f"sweep/accuracy/{method}.json")] == \
                sorted(p["density"] for p in points if p["method"] == method)
        with Image.open(project.root / "sweep/density_curve.png") as image:
            assert image.format == "PNG" and image.size[0] >= 800
        shown = json.loads(project.dvc("plots", "show", "--json").stdout)
        assert not shown.get("errors"), shown.get("errors")
        expected = {"sweep/accuracy/lth.json", "sweep/accuracy/magnitude.json", "sweep/cwv/lth.json", "dense training",
                    "final training of the pruned model", "tuning trials"}
        assert expected <= set(shown["data"]), sorted(shown["data"])
    finally:
        project.restore()
    assert json.loads(project.dvc("status", "--json").stdout) == {}


@pytest.mark.parametrize("change, stage, message", [
    ({"prune": {"method": "prayer"}}, "tune", "unknown pruning method 'prayer'"),  # tune reads prune.method
    ({"base": {"density": 1.5}}, "tune", "base.density: must be in (0, 1], got 1.5"),
    ({"base": {"dataset": "npz"}, "data": {"path": "missing.npz"}}, "prepare", "npz: file 'missing.npz' not found"),
])
def test_bad_params_fail_fast_write_nothing_and_the_old_results_come_back(project, change, stage, message):
    before = project.output_hashes()
    good = project.params()
    bad = json.loads(json.dumps(good))
    for group, values in change.items():
        bad[group].update(values)
    project.write_params(bad)
    try:
        result = project.dvc("repro", check=False)
    finally:
        project.write_params(good)
    assert result.returncode != 0
    assert f"{stage}: error: {message}" in result.stderr + result.stdout
    after = project.output_hashes()
    changed = sorted(path for path, digest in after.items() if before.get(path) != digest)
    assert not changed, f"a failed stage changed or half-wrote {changed}"
    upstream = STAGES[:STAGES.index(stage)]
    kept = {"prepare": "artifacts/data/", "train_dense": "artifacts/dense/"}
    for earlier in upstream:
        if earlier in kept:
            assert [p for p in after if p.startswith(kept[earlier])], f"{earlier}'s output must stay in place"
    repaired = project.dvc("repro")
    for trained in ("prepare", "train_dense", "prune"):
        assert f"Running stage '{trained}'" not in repaired.stdout, f"{trained} re-ran instead of being restored"
    final = project.output_hashes()
    assert final["metrics.json"] == before["metrics.json"]
    assert {k: v for k, v in final.items() if k.startswith("artifacts/prune/")} == \
        {k: v for k, v in before.items() if k.startswith("artifacts/prune/")}
    assert json.loads(project.dvc("status", "--json").stdout) == {}


def test_the_service_serves_the_registered_compact_model_and_its_card(project):
    import httpx

    from serving.settings import Settings
    from tests.test_serving import free_port, in_thread

    export, metrics = project.json("artifacts/export/export.json"), project.json("metrics.json")
    settings = Settings(model_uri=f"models:/{MODEL_NAME}@challenger", tracking_uri=project.tracking_uri(),
                        port=free_port(), log_level="warning")
    with in_thread(settings) as url:
        meta = httpx.get(f"{url}/metadata").json()
        card = httpx.get(f"{url}/model-card")
    plain = Settings(model_uri=str(project.root / "artifacts/export/model.onnx"), port=free_port(), log_level="warning")
    with in_thread(plain) as url:
        assert httpx.get(f"{url}/model-card").text == card.text, "the exported file's card lies beside it"
    assert meta["onnx_format"] == "compact" and meta["granularity"] == "weight" and meta["quantization"] == "none"
    assert meta["density"] == metrics["density"]
    assert 0 < meta["file_bytes"] <= 1.05 * export["onnx_bytes"] + 4096  # the registry may add a small header
    assert card.status_code == 200 and card.text == (project.root / "artifacts/model_card.md").read_text()
