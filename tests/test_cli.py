import json
import math
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from ballot.cli import main
from ballot.data import DATASETS
from ballot import experiment
from ballot.config import apply_overrides, experiment_from_params
from ballot.errors import StorageError
from ballot.experiment import lost_learning_warning, weak_dense_warning
from ballot.masks import Mask, budget
from ballot.models import MODELS
from ballot.pruning import PRUNERS
from serving.settings import DEVICES, LOG_LEVELS
from tests.conftest import TINY

TINY_FLAGS = [flag for item in TINY if not item.startswith("base.") for flag in ("--set", item)]


def test_prune_writes_mask_weights_and_metrics_then_evaluate_reproduces_them(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--dataset", "digits", "--model", "mlp", "--method", "lth", "--density", "0.05",
                 "--seed", "0", "--device", "cpu", "--out", str(out), *TINY_FLAGS])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"acc", "per_class", "cwv", "mcd", "density", "worst_class"} <= set(metrics)
    assert len(metrics["per_class"]) == 10 and metrics["method"] == "lth"
    mask = Mask.load(out / "mask.safetensors")
    assert mask.kept == budget(mask.total, 0.05) and metrics["density"] == mask.density()
    assert (out / "model.safetensors").is_file() and (out / "dense" / "rewind.safetensors").is_file()
    assert metrics["dense"]["acc"] > 0 and metrics["worst_class_name"] in [str(c) for c in range(10)]
    block = capsys.readouterr().out  # the summary block ends the run
    assert block.splitlines()[0].split() == ["method", "lth"] and "(dense " in block and "worst class" in block
    assert main(["evaluate", "--dir", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["acc"] == metrics["acc"] and again["cwv"] == metrics["cwv"]
    if not torch.cuda.is_available():  # a run recorded on a GPU is evaluated here on the CPU
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "base": {**config["base"], "device": "cuda"}}))
        assert main(["evaluate", "--dir", str(out)]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["acc"] == metrics["acc"]
        assert "the run's device 'cuda' is not available here; evaluating on cpu" in captured.err
        assert main(["evaluate", "--dir", str(out), "--device", "cuda"]) == 2
        assert "--device: device 'cuda' requested but CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--set", "base.dataset=nope"], "unknown dataset 'nope'"),
    (["--set", "base.model=transformer"], "unknown model 'transformer'"),
    (["--set", "prune.method=prayer"], "unknown pruning method 'prayer'"),
    (["--density", "1.5"], r"base.density: must be in \(0, 1\]"),
    (["--set", "prune.lth_roundz=2"], r"unknown key\(s\) \['lth_roundz'\]"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code = main(["prune", "--dataset", "digits", "--out", str(out), *TINY_FLAGS, *flags])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists(), "nothing may be written for bad input"


def test_more_processes_than_cuda_devices_are_refused_before_any_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--device", "cuda", "--nproc", "2", "--out", str(out), *TINY_FLAGS]) == 2
    assert "--nproc 2: this machine has 1 CUDA device(s), one per process is needed" in capsys.readouterr().err
    assert not out.exists()


def test_more_processes_than_cpu_cores_are_refused_before_any_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--nproc", "3", "--out", str(out), *TINY_FLAGS]) == 2
    assert "--nproc 3: this process may use 2 CPU core(s)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("environment, message", [
    ({"WORLD_SIZE": "x"}, "WORLD_SIZE='x' is not a number of processes; unset it"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT not, as torchrun would"),
])
def test_a_torchrun_variable_left_in_the_shell_is_named(tmp_path, capsys, monkeypatch, environment, message):
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["prune", "--dataset", "digits", "--out", str(tmp_path / "run"), *TINY_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ballot: error: {message}") and "\n" not in err, err


def test_evaluate_of_a_folder_without_outputs(tmp_path, capsys):
    assert main(["evaluate", "--dir", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["prune"], ["evaluate"], ["config"]])
def test_help_on_every_command(command):
    result = subprocess.run([sys.executable, "-m", "ballot.cli", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: ballot" in result.stdout


def test_every_default_fits_a_small_dataset(tmp_path, capsys):
    """`ballot prune --dataset digits` with no other flag: the rewind point and every schedule scale with the data,
    and the schedules that their min_steps lengthens (digits makes 11 steps an epoch) are named."""
    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--device", "cpu", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    steps_an_epoch = math.ceil(int(re.search(r"train (\d+)", err).group(1)) / 128)
    epochs = math.ceil(500 / steps_an_epoch)  # the default min_steps over the default batch size's steps
    assert (f"train_dense 20 -> {epochs}, prune.ballot.obs_epochs 20 -> {epochs}, "
            f"prune.ballot.refine_train 20 -> {epochs};") in err
    assert "safecompress" not in err and "prune.retrain" not in err, "only the schedules Ballot runs are named"
    assert len(json.loads((out / "history.json").read_text())) == epochs, "the refined training ran them"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ballot" and metrics["acc"] > 0.8
    mask = Mask.load(out / "mask.safetensors")
    assert mask.kept == budget(mask.total, 0.05)


@pytest.mark.parametrize("overrides, named", [
    (["prune.method=lth"], ["train_dense 20 -> 63", "prune.retrain 20 -> 63"]),
    (["prune.method=lth", "prune.final_train=refined"],
     ["train_dense 20 -> 63", "prune.retrain 20 -> 63", "prune.ballot.refine_train 20 -> 63"]),
    (["prune.method=magnitude", "prune.retrain.min_steps=0"], ["train_dense 20 -> 63"]),
    (["prune.method=safecompress"], ["train_dense 20 -> 63", "prune.safecompress 60 -> 188"]),
    (["prune.method=ballot", "prune.ballot.rounds=1"], ["train_dense 20 -> 63", "prune.ballot.refine_train 20 -> 63"]),
])
def test_the_stretch_notice_names_only_the_schedules_the_method_runs(overrides, named):
    cfg = experiment_from_params(apply_overrides({}, overrides))
    notice = experiment.stretch_notice(cfg, 1000)  # 8 steps an epoch: 500 steps take 63 epochs, 1500 take 188
    assert re.search(r"\(epochs\): (.*); min_steps=0", notice).group(1) == ", ".join(named)


@pytest.mark.parametrize("flags, message", [
    (["--device", "gpu0"], "base.device:"),
    (["--set", "train_dense.rewind_iter=100000"], r"train_dense.rewind_iter \(100000\) is beyond the"),
    (["--set", "prun.method=lth"], r"unknown group\(s\) \['prun'\]"),
])
def test_more_bad_input_is_named_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--out", str(out), *TINY_FLAGS, *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_dense_reuse_is_checked_against_the_configuration(tmp_path, capsys):
    dense = tmp_path / "dense"
    args = ["prune", "--dataset", "digits", "--method", "magnitude", "--dense", str(dense), *TINY_FLAGS]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert (dense / "dense.json").is_file()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "dense: reusing" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c"), "--seed", "7"]) == 2
    assert "trained with other settings (seed)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert not list(tmp_path.glob(".*.tmp*")), "no temp folder left"
    assert main([*args, "--out", str(tmp_path / "d"), "--set", f"data.root={tmp_path}"]) == 0, \
        "where the data is read from does not decide the dense states"
    manifest = json.loads((dense / "dense.json").read_text())
    for text, message in (("{trunc", "is not valid JSON"), ("[1, 2]", "is not a dense-state manifest")):
        (dense / "dense.json").write_text(text)
        assert main([*args, "--out", str(tmp_path / "e")]) == 2
        assert message in capsys.readouterr().err
    (dense / "dense.json").write_text(json.dumps({**manifest, "data": {**manifest["data"], "root": "/elsewhere"}}))
    assert main([*args, "--out", str(tmp_path / "f")]) == 0, "a manifest that recorded the location still matches"


def test_dense_states_are_saved_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    dense = tmp_path / "dense"

    def save_then_fail(*args, **kwargs):  # every file written, then the disk fills
        experiment_save_dense(*args, **kwargs)
        raise StorageError("disk full")

    experiment_save_dense = experiment.save_dense
    monkeypatch.setattr(experiment, "save_dense", save_then_fail)
    args = ["prune", "--dataset", "digits", "--method", "magnitude", "--dense", str(dense), *TINY_FLAGS]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2 and "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "neither the dense folder nor a temp folder"


def test_a_run_never_replaces_a_folder_it_did_not_write_nor_one_holding_its_dense_states(tmp_path, capsys):
    args = ["prune", "--dataset", "digits", "--method", "magnitude", *TINY_FLAGS]
    keep = tmp_path / "runs" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("a user's file")
    assert main([*args, "--out", str(keep.parent)]) == 2
    assert "--out '" in (err := capsys.readouterr().err) and "is not a `ballot prune` output (no config.json)" in err
    assert main([*args, "--out", str(tmp_path / "run"), "--dense", str(tmp_path / "run" / "dense")]) == 2
    assert "lies inside --out" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "run"), "--dense", str(keep.parent)]) == 2
    assert "holds other files but not the dense states" in capsys.readouterr().err
    assert keep.read_text() == "a user's file" and not (tmp_path / "run").exists()
    for command in (args, ["tune", "--dataset", "digits", *TINY_FLAGS]):  # a file as --dense: refused, untouched
        assert main([*command, "--out", str(tmp_path / "run"), "--dense", str(keep)]) == 2
        assert f"--dense '{keep}' is not a folder" in _one_line_error(capsys)
        assert keep.read_text() == "a user's file" and sorted(p.name for p in keep.parent.iterdir()) == ["notes.txt"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0 and main([*args, "--out", str(tmp_path / "run")]) == 0


def test_dense_reuse_refuses_states_trained_on_other_data_under_the_same_settings(tiny_data, tiny_dense, tmp_path):
    """A data file replaced in place keeps every setting, so only the recorded digest of the data tells."""
    import dataclasses

    from tests.conftest import tiny_config

    experiment.save_dense(tiny_dense, tmp_path, tiny_config(), tiny_data)
    experiment.check_dense_reuse(tmp_path, tiny_config(), tiny_data)
    relabelled = dataclasses.replace(tiny_data, train=dataclasses.replace(tiny_data.train, y=tiny_data.train.y.flip(0)))
    with pytest.raises(StorageError, match="were trained on other data"):
        experiment.check_dense_reuse(tmp_path, tiny_config(), relabelled)
    experiment.save_dense(tiny_dense, tmp_path, tiny_config())  # a manifest without a digest (older runs) is accepted
    experiment.check_dense_reuse(tmp_path, tiny_config(), relabelled)


def test_tune_refuses_a_file_as_out_and_an_unreachable_storage_before_training(tmp_path, capsys):
    args = ["tune", "--dataset", "digits", *TINY_FLAGS]
    (tmp_path / "notes.txt").write_text("a user's file")
    assert main([*args, "--out", str(tmp_path / "notes.txt")]) == 2
    assert "is not a folder" in _one_line_error(capsys)
    tracking = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    unreachable = ["--storage", "postgresql://nobody@127.0.0.1:1/none"]
    assert main([*args, "--out", str(tmp_path / "t"), *tracking, *unreachable]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after MLflow's own lines, if it creates its database
    assert error.startswith("ballot: error: cannot open the Optuna storage postgresql://nobody@127.0.0.1:1/none")
    assert not (tmp_path / "t").exists(), "no dense model trained first"
    assert main([*args, "--out", str(tmp_path / "t"), "--storage", "sqlite://"]) == 2
    assert "in-memory database" in _one_line_error(capsys)
    assert main([*args, "--out", str(tmp_path / "t"), "--tracking-uri", str(tmp_path / "mlruns"),
                 "--storage", f"sqlite:///{tmp_path / 's' / 'study.db'}"]) == 2
    assert "is a file store" in _one_line_error(capsys) and not (tmp_path / "t").exists()
    assert not (tmp_path / "s").exists(), "the tracking store is checked before the storage is created"


@pytest.mark.slow
def test_tune_replaces_its_report_folder_whole(tmp_path, capsys):
    stale = tmp_path / "t" / "report" / "pareto_front.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")  # an earlier study's report file
    assert main(["tune", "--dataset", "digits", *TINY_FLAGS, "--out", str(tmp_path / "t"), "--n-trials", "1"]) == 0
    assert not stale.exists() and (tmp_path / "t" / "report" / "summary.json").is_file()


def test_a_dense_model_near_chance_is_warned_about(tmp_path, capsys):
    args = ["prune", "--dataset", "digits", "--method", "magnitude", *TINY_FLAGS]
    assert main([*args, "--out", str(tmp_path / "fit")]) == 0
    err = capsys.readouterr().err
    assert "warning:" not in err and "note:" not in err, "a fit dense model; min_steps 0: no schedule is lengthened"
    assert main([*args, "--out", str(tmp_path / "unfit"), "--set", "train_dense.lr=1e-6"]) == 0
    assert "warning: the dense model's balanced validation accuracy is 0." in capsys.readouterr().err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_run_leaves_the_previous_output_untouched(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["prune", "--dataset", "digits", "--method", "magnitude", "--out", str(out), *TINY_FLAGS]
    assert main(args) == 0
    before = _tree(out)
    real_save = experiment.save_pruned

    def save_half_then_fail(folder, *rest, **kwargs):  # the new output half-written when the run stops
        real_save(folder, *rest, **kwargs)
        (Path(folder) / "mask.safetensors").write_bytes(b"half")
        raise StorageError("disk full")

    monkeypatch.setattr(experiment, "save_pruned", save_half_then_fail)
    assert main([*args, "--seed", "1"]) == 2 and "disk full" in capsys.readouterr().err
    assert _tree(out) == before, "every file of the previous run, dense states included, as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no temp folder left beside it"


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"ballot {metadata.version('ballot')}\n"


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps long choice lists


def test_help_lists_the_choices_of_every_fixed_set(capsys):
    text = _help("prune", capsys)
    for flag, names in (("--dataset", DATASETS), ("--model", MODELS), ("--method", PRUNERS)):
        assert f"{flag} {{{','.join(sorted(names))}}}" in text
    assert "'cuda[:N]'" in text  # --device is open-ended (cuda:1, ...): its help names the forms
    text = _help("serve", capsys)
    assert f"--device {{{','.join(DEVICES)}}}" in text and f"--log-level {{{','.join(LOG_LEVELS)}}}" in text


def test_a_name_outside_the_choices_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--method", "prayer", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "argument --method: invalid choice: 'prayer'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny magnitude-pruned `ballot prune` folder shared by the export and register tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["prune", "--dataset", "digits", "--method", "magnitude", "--out", str(out), *TINY_FLAGS]) == 0
    return out


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A sqlite MLflow registry in a temp folder (the working directory too, so artifacts land there)."""
    mlflow = pytest.importorskip("mlflow")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    yield uri, mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.mark.slow
def test_export_writes_an_onnx_file_that_matches_pytorch_then_register_aliases_it(pruned, tmp_path, registry, capsys):
    import onnxruntime as ort
    import torch

    from ballot.config import experiment_from_params
    from ballot.experiment import load_pruned, prepare_data
    from ballot.export import bake, read_metadata

    onnx_path = tmp_path / "out" / "model.onnx"
    assert main(["export", "--dir", str(pruned), "--out", str(onnx_path)]) == 0
    assert [p.name for p in onnx_path.parent.iterdir()] == ["model.onnx"], "no temp file may be left behind"
    metrics = json.loads((pruned / "metrics.json").read_text())
    card = read_metadata(onnx_path)
    assert card["method"] == "magnitude" and card["input_shape"] == [1, 8, 8] and len(card["class_names"]) == 10
    assert card["acc"] == metrics["acc"] and card["dense_acc"] == metrics["dense"]["acc"]
    cfg = experiment_from_params(json.loads((pruned / "config.json").read_text()))
    data = prepare_data(cfg)
    baked = bake(*load_pruned(pruned, cfg, data))
    with torch.no_grad():
        expected = baked(data.test.x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: data.test.x.numpy()})[0]
    assert abs(got - expected).max() < 1e-4 and (got.argmax(1) == expected.argmax(1)).all()

    uri, client = registry
    capsys.readouterr()
    assert main(["register", "--onnx", str(onnx_path), "--name", "cli-test", "--alias", "staging",
                 "--tracking-uri", uri]) == 0
    assert "models:/cli-test@staging" in capsys.readouterr().out
    version = client.get_model_version_by_alias("cli-test", "staging")
    assert str(version.version) == "1"
    assert float(version.tags["acc"]) == metrics["acc"] and float(version.tags["dense_acc"]) == metrics["dense"]["acc"]
    assert main(["register", "--onnx", str(onnx_path), "--name", "cli-test", "--tracking-uri", uri]) == 0
    assert str(client.get_model_version_by_alias("cli-test", "challenger").version) == "2"
    assert str(client.get_model_version_by_alias("cli-test", "staging").version) == "1"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ballot: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "is not a folder"),
    (lambda tmp: tmp, "has no config.json"),
])
def test_export_of_a_folder_that_is_not_a_prune_output(tmp_path, capsys, make, message):
    out = tmp_path / "model.onnx"
    assert main(["export", "--dir", str(make(tmp_path)), "--out", str(out)]) == 2
    assert message in _one_line_error(capsys) and not out.exists()


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00binary", "config.json"),
    (b"[1, 2]", "does not hold a configuration"),
])
def test_a_corrupt_run_folder_config_is_a_one_line_error(tmp_path, capsys, content, message):
    (tmp_path / "config.json").write_bytes(content)
    assert main(["evaluate", "--dir", str(tmp_path)]) == 2
    assert message in _one_line_error(capsys)


def test_export_of_a_folder_with_a_broken_file(pruned, tmp_path, capsys):
    broken = tmp_path / "run"
    broken.mkdir()
    for name in ("config.json", "mask.safetensors"):
        (broken / name).write_bytes((pruned / name).read_bytes())
    (broken / "metrics.json").write_text("{not json")
    assert main(["export", "--dir", str(broken), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "metrics.json' is not valid JSON" in _one_line_error(capsys)
    (broken / "metrics.json").write_bytes((pruned / "metrics.json").read_bytes())
    assert main(["export", "--dir", str(broken), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "model.safetensors' not found" in _one_line_error(capsys)
    assert main(["export", "--dir", str(pruned), "--out", str(tmp_path)]) == 2
    assert "is a folder" in _one_line_error(capsys)
    weights = (pruned / "model.safetensors").read_bytes()
    assert main(["export", "--dir", str(pruned), "--out", str(pruned / "model.safetensors")]) == 2
    assert "does not end in .onnx" in _one_line_error(capsys) and (pruned / "model.safetensors").read_bytes() == weights


def test_export_settings_can_change_at_export_and_only_they(pruned, tmp_path, capsys):
    from ballot.export import read_metadata

    out = tmp_path / "int8.onnx"
    assert main(["export", "--dir", str(pruned), "--out", str(out), "--set", "export.quantize=dynamic",
                 "--set", "export.max_quant_acc_drop=1", "--set", "export.max_quant_cwv_rise=1"]) == 0
    assert "INT8" in capsys.readouterr().err and read_metadata(out)["quantization"] == "dynamic"
    assert main(["export", "--dir", str(pruned), "--out", str(tmp_path / "b.onnx"), "--set", "base.density=0.5"]) == 2
    assert "--set base.density=0.5: only export.* settings can change here" in _one_line_error(capsys)
    assert not (tmp_path / "b.onnx").exists()


def _linear():
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).eval()


def test_register_refuses_what_it_cannot_register(tmp_path, registry, capsys):
    from ballot.export import export_onnx

    uri, client = registry
    (tmp_path / "garbage.onnx").write_bytes(b"garbage")
    bare = export_onnx(_linear(), (1, 2, 3), tmp_path / "bare.onnx", {"dataset": "toy"})
    for path, message in ((tmp_path / "nope.onnx", "not found"), (tmp_path / "garbage.onnx", "is not an ONNX file"),
                          (bare, "has no model card entries ['density'")):
        assert main(["register", "--onnx", str(path), "--tracking-uri", uri]) == 2
        assert message in _one_line_error(capsys)
    assert client.search_registered_models() == [], "nothing may be registered"
    card = {"density": 0.5, "acc": 0.8, "cwv": 0.01, "mcd": 0.2, "worst_class": 0.6, "dataset": "toy",
            "method": "lth", "model": "linear", "class_names": ["a", "b", "c"], "input_shape": [1, 2, 3]}
    carded = export_onnx(_linear(), (1, 2, 3), tmp_path / "carded.onnx", card)
    for flags, message in ((["--alias", "champion"], "moves only through `ballot promote`"),
                           (["--alias", "v2"], "Version alias name 'v2' is reserved"),
                           (["--alias", "a" * 256], "exceeds the maximum length of 255"),
                           (["--name", "team/model"], "Names cannot contain '/' or ':'")):
        assert main(["register", "--onnx", str(carded), *flags, "--tracking-uri", uri]) == 2
        assert message in _one_line_error(capsys)
    assert client.search_registered_models() == [], "nothing may be registered"


@pytest.mark.parametrize("per_class, warned", [
    ([0.3, 0.2, float("nan")], True),  # balanced 0.25 over the 2 classes present; chance 1/3, the bar 0.5
    ([0.6, 0.4, 0.5], False),  # balanced 0.5: exactly at the bar
    ([0.9, 0.0, 0.9], False),  # one class lost, but the model has learned
    ([float("nan")] * 3, False),  # no validation samples: nothing to judge
])
def test_weak_dense_warning_compares_balanced_accuracy_with_chance(per_class, warned):
    assert (weak_dense_warning({"per_class": per_class}) is not None) == warned


@pytest.mark.parametrize("pruned, dense, warned", [
    ([0.2, 0.2, 0.2, 0.2, 0.2], [0.99] * 5, True),  # at chance (0.2) where the dense model learned (a dead network)
    ([0.4, 0.4, 0.4, 0.4, 0.4], [1.0] * 5, False),  # exactly a quarter of the way from chance to the dense model's
    ([0.9, 0.0, 0.9, 0.9, 0.9], [1.0] * 5, False),  # one class lost, the rest learned: CWV's business, not this one's
    ([0.2] * 5, [0.3] * 5, False),  # a weak dense model: weak_dense_warning speaks instead
    ([float("nan")] * 5, [1.0] * 5, False),  # no validation samples
    ([0.2, 0.2, 0.2, 0.2], [0.99] * 5, False),  # metrics of another number of classes: nothing to compare
    ([0.2, 0.2, 0.2, 0.2, 0.2], [0.99, 0.99, 0.99, 0.99, None], True),  # a class without validation samples, as
])                                                                       # the prune stage reads it back from JSON
def test_lost_learning_warning_compares_the_pruned_model_with_the_dense_one(pruned, dense, warned):
    warning = lost_learning_warning({"per_class": pruned}, {"per_class": dense})
    assert (warning is not None) == warned
    if warned:
        assert warning.startswith("warning: the pruned model's balanced validation accuracy is 0.200 against the "
                                  "dense model's 0.990 (chance 0.200)")


def test_a_stray_rank_outside_torchrun_does_not_silence_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")  # set by some other launcher; WORLD_SIZE is not
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["prune", "--dataset", "digits", "--out", str(tmp_path / "run"), "--set", "base.density=3"]) == 2
    assert "ballot: error: base.density: must be in (0, 1]" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    for command in ("prune", "tune"):
        code = main([command, "--dataset", "digits", "--out", str(locked / "run")])
        assert code == 2
        assert capsys.readouterr().err.strip() == (f"ballot: error: --out '{locked / 'run'}': cannot write in "
                                                   f"'{locked}' (permission denied)")


def test_ctrl_c_and_file_errors_end_in_one_line(capsys, monkeypatch):
    import ballot.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    def denied(args):
        raise PermissionError(13, "Permission denied", "/somewhere/out")

    def broken(args):
        raise OSError("no file named")

    for command, expected in ((interrupted, 130), (denied, 2)):
        monkeypatch.setattr(cli, "cmd_evaluate", command)
        assert main(["evaluate", "--dir", "x"]) == expected
    err = capsys.readouterr().err.splitlines()
    assert err == ["ballot: interrupted", "ballot: error: Permission denied: '/somewhere/out'"]
    monkeypatch.setattr(cli, "cmd_evaluate", broken)
    with pytest.raises(OSError, match="no file named"):  # an OSError about no file is a defect: shown whole
        main(["evaluate", "--dir", "x"])


def test_the_writable_check_looks_where_the_run_writes(tmp_path, monkeypatch):
    from ballot.cli import _check_writable
    from ballot.errors import ConfigError

    locked, inside = tmp_path / "locked", tmp_path / "locked" / "out"
    inside.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    _check_writable(inside, "--out", replaced_whole=False)  # tune writes inside an existing --out
    with pytest.raises(ConfigError, match="cannot write in"):
        _check_writable(inside, "--out", replaced_whole=True)  # prune replaces it from its parent


def test_prune_applies_a_best_params_file_of_ballot_tune(tmp_path, capsys):
    best = tmp_path / "best_params.yaml"
    best.write_text("study: s\nparams:\n  prune.ballot.conflict: protect\n  prune.ballot.conflict_threshold: 0.25\n")
    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--model", "mlp", "--method", "ballot", "--density", "0.1",
                 "--device", "cpu", "--out", str(out), "--best", str(best), *TINY_FLAGS]) == 0
    assert f"prune: applying 2 tuned value(s) from {best}" in capsys.readouterr().err
    ran = json.loads((out / "config.json").read_text())["prune"]["ballot"]
    assert (ran["conflict"], ran["conflict_threshold"]) == ("protect", 0.25)
    assert json.loads((out / "details.json").read_text())["tuned_params"] == {
        "prune.ballot.conflict": "protect", "prune.ballot.conflict_threshold": 0.25}
    for flags, message in ((["--best", str(tmp_path / "absent.yaml")], "--best '.*absent.yaml' not found"),
                           (["--best", str(best), "--method", "lth"], "--best applies tuned Ballot values; "
                                                                      "prune.method is 'lth'")):
        assert main(["prune", "--dataset", "digits", "--out", str(tmp_path / "x"), *flags]) == 2
        assert re.search(message, capsys.readouterr().err)
