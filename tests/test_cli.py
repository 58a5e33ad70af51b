import json
import re
import subprocess
import sys

import pytest

from ballot.cli import main
from ballot.masks import Mask, budget
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
    capsys.readouterr()
    assert main(["evaluate", "--dir", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["acc"] == metrics["acc"] and again["cwv"] == metrics["cwv"]


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--model", "transformer"], "unknown model 'transformer'"),
    (["--method", "prayer"], "unknown pruning method 'prayer'"),
    (["--density", "1.5"], r"base.density: must be in \(0, 1\]"),
    (["--set", "prune.lth_roundz=2"], r"unknown key\(s\) \['lth_roundz'\]"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code = main(["prune", "--dataset", "digits", "--out", str(out), *TINY_FLAGS, *flags])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists(), "nothing may be written for bad input"


def test_evaluate_of_a_folder_without_outputs(tmp_path, capsys):
    assert main(["evaluate", "--dir", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["prune"], ["evaluate"], ["config"]])
def test_help_on_every_command(command):
    result = subprocess.run([sys.executable, "-m", "ballot.cli", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: ballot" in result.stdout


def test_every_default_fits_a_small_dataset(tmp_path):
    """`ballot prune --dataset digits` with no other flag: the rewind point and every schedule scale with the data."""
    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--device", "cpu", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ballot" and metrics["acc"] > 0.8
    mask = Mask.load(out / "mask.safetensors")
    assert mask.kept == budget(mask.total, 0.05)


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


def test_a_failed_run_leaves_the_previous_output_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--method", "magnitude", "--out", str(out), *TINY_FLAGS]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # a --dense folder that cannot be checked fails inside the run, after the old output already exists
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("init.safetensors", "rewind.safetensors", "dense.safetensors"):
        (broken / name).write_bytes(b"garbage")
    code = main(["prune", "--dataset", "digits", "--method", "lth", "--out", str(out), "--dense", str(broken),
                 *TINY_FLAGS])
    assert code == 2 and "dense.json" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
