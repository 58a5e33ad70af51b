"""Data parallelism on CPU (gloo): two processes started by torchrun select the single-process mask, load the data
in turns and report an error once; BatchNorm is synchronised on GPUs only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ballot import distributed
from ballot.masks import Mask, budget
from ballot.models import build_model
from ballot.storage import load_tensors
from ballot import train as train_module
from ballot.train import _synced_batchnorm, _syncs_batchnorm
from tests.conftest import TINY
from tests.proc import naming, needs_proc_children

pytestmark = pytest.mark.slow

FLAGS = ["--dataset", "digits", "--model", "mlp", "--density", "0.05", "--seed", "0", "--device", "cpu",
         *[flag for item in TINY if not item.startswith("base.") for flag in ("--set", item)]]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def prune(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ballot.cli", "prune", *FLAGS, "--out", str(out), *extra],
                          env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method,extra", [("lth", []), ("ballot", []),
                                          ("ballot", ["--set", "prune.ballot.conflict=share"])])
def test_two_processes_select_the_single_process_mask(tmp_path, method, extra):
    chosen = ["--method", method, *extra]
    single, double = prune(tmp_path / "one", *chosen), prune(tmp_path / "two", *chosen, "--nproc", "2")
    assert single.returncode == 0, single.stderr
    assert double.returncode == 0, double.stderr
    one, two = Mask.load(tmp_path / "one" / "mask.safetensors"), Mask.load(tmp_path / "two" / "mask.safetensors")
    assert two.kept == budget(two.total, 0.05) == one.kept
    differing = sum(int((one[n] ^ two[n]).sum()) for n in one) / 2
    assert differing <= 0.005 * one.kept, f"{differing} of {one.kept} kept weights differ from one process"
    weights = load_tensors(tmp_path / "two" / "model.safetensors", "model")
    assert all(torch.count_nonzero(weights[n][~two[n]]) == 0 for n in two), "a pruned weight is not zero"
    printed = [line.split() for line in double.stdout.splitlines() if line.startswith("method ")]
    assert printed == [["method", method]], "rank 0 alone prints the summary"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"], "only rank 0's output folder is left"
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["method"] == method


@needs_proc_children
@pytest.mark.parametrize("target, signal_number", [("ballot", signal.SIGINT), ("ballot", signal.SIGTERM),
                                                   ("torchrun", signal.SIGKILL)])
def test_a_signal_to_the_launching_process_alone_stops_every_worker(tmp_path, target, signal_number):
    """`kill -INT` or `kill -TERM` of the `ballot prune --nproc 2` process, or `kill -9` of its torchrun: no worker
    trains on and writes --out."""
    out = tmp_path / "out"
    launched = subprocess.Popen([sys.executable, "-m", "ballot.cli", "prune", *FLAGS, "--method", "lth", "--nproc",
                                 "2", "--out", str(out), "--set", "train_dense.epochs=5000"], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(naming(str(out))) < 4 and time.monotonic() < deadline:  # this one, torchrun, two workers
        time.sleep(0.2)
    time.sleep(3)  # the workers are training
    victim = launched.pid if target == "ballot" else next(pid for pid in naming(str(out))
                                                         if pid in naming("torch.distributed.run"))
    os.kill(victim, signal_number)
    stderr = launched.communicate(timeout=120)[1]
    deadline = time.monotonic() + 60
    while (left := naming(str(out))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [] and not out.exists(), stderr
    expected = {signal.SIGINT: 130, signal.SIGTERM: -signal.SIGTERM, signal.SIGKILL: 128 + signal.SIGKILL}
    assert launched.returncode == expected[signal_number], stderr
    if signal_number == signal.SIGINT:
        assert stderr.count("ballot: interrupted") == 1, stderr


def torchrun(*command: str) -> subprocess.CompletedProcess:
    """``command`` (a script and its arguments, or -m and a module) in two processes started by torchrun."""
    with tempfile.TemporaryDirectory() as logs:  # not a torchelastic_* folder left in /tmp
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "--log-dir", logs, *command],
                              env={**ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                              capture_output=True, text=True, timeout=300)


def test_processes_that_disagree_on_a_mask_are_stopped(tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(
        "import torch\n"
        "from ballot import distributed\n"
        "distributed.start(torch.device('cpu'))\n"
        "distributed.check_identical({'w': torch.full((3,), distributed.rank())}, 'the test mask')\n")
    run = torchrun(str(script))
    assert run.returncode != 0
    assert "the test mask differs between rank" in run.stdout + run.stderr


# the opening of a script that trains under torchrun, one CPU process per rank
TRAINING_SCRIPT = (
    "import torch\n"
    "from torch import nn\n"
    "from ballot import distributed\n"
    "from ballot.config import TrainConfig\n"
    "from ballot.data import Split\n"
    "from ballot.train import train\n"
    "distributed.start(torch.device('cpu'))\n"
)


def test_the_plateau_schedule_follows_rank_0s_metric_on_every_rank(tmp_path):
    """Each rank's validation pass may differ (its BatchNorm statistics come from its own shard); the lr must not."""
    script = tmp_path / "plateau.py"
    script.write_text(
        TRAINING_SCRIPT +
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(4, 3))\n"
        "data = Split(torch.randn(64, 4), torch.arange(64) % 3)\n"
        "calls = []\n"
        "def metric(model):  # rank 0 never improves (its lr decays each epoch); rank 1 always does\n"
        "    calls.append(1)\n"
        "    return float(len(calls)) if distributed.rank() == 1 else 0.0\n"
        "cfg = TrainConfig(epochs=4, batch_size=16, schedule='plateau', patience=0, min_steps=0)\n"
        "result = train(model, data, cfg, epoch_metric=metric)\n"
        f"open(f'{tmp_path}/lr{{distributed.rank()}}.txt', 'w').write(str([r['lr'] for r in result.history]))\n"
        "distributed.check_identical(dict(model.named_parameters()), 'the trained weights')\n")
    run = torchrun(str(script))
    assert run.returncode == 0, run.stdout + run.stderr
    lrs = [[round(lr, 8) for lr in eval((tmp_path / f"lr{rank}.txt").read_text())] for rank in (0, 1)]
    assert lrs == [[0.05, 0.05, 0.005, 0.0005]] * 2, lrs


def test_batchnorm_is_synchronised_over_the_processes_on_gpus_only(monkeypatch):
    """With several processes the BatchNorm layers train as SyncBatchNorm layers holding the same tensors, and are
    put back after; on CPUs they stay as they are (torch's SyncBatchNorm refuses CPU tensors)."""
    assert not _syncs_batchnorm(torch.device("cuda"))  # a single process
    monkeypatch.setattr(distributed, "active", lambda: True)
    assert _syncs_batchnorm(torch.device("cuda")) and not _syncs_batchnorm(torch.device("cpu"))
    model = build_model("resnet20", (1, 8, 8), 10)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    names = list(model.state_dict())
    with _synced_batchnorm(model, torch.device("cpu")):
        assert all(model.get_submodule(name) is layer for name, layer in layers.items())
    # the swap itself, on a device that holds no data ('meta'), as the GPU case does it
    monkeypatch.setattr(train_module, "_syncs_batchnorm", lambda device: True)
    with _synced_batchnorm(model, torch.device("meta")):
        synced = {name: m for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)}
        assert synced.keys() == layers.keys()
        assert all(synced[name].weight is layer.weight and synced[name].running_var is layer.running_var
                   for name, layer in layers.items())
        assert list(model.state_dict()) == names
        model.to("meta")  # as the training does: a no-op, the model moved before the swap
        assert all(synced[name].running_mean is layer.running_mean for name, layer in layers.items())
    assert all(model.get_submodule(name) is layer for name, layer in layers.items())
    # the statistics the training updated are the original layers': moved with the model, not left on the CPU
    assert {layer.running_mean.device.type for layer in layers.values()} == {"meta"}


def test_batchnorm_normalises_each_process_share_on_cpus(tmp_path):
    """Pins the CPU (gloo) behaviour docs/scale.md states: after one step on a global batch of 16, each process's
    running mean (momentum 1) is the mean of its own 8 samples."""
    script = tmp_path / "batchnorm.py"
    script.write_text(
        TRAINING_SCRIPT +
        "model = nn.Sequential(nn.BatchNorm1d(1, momentum=1.0), nn.Linear(1, 2))\n"
        "data = Split(torch.arange(16.0).unsqueeze(1), torch.arange(16) % 2)\n"
        "train(model, data, TrainConfig(epochs=1, batch_size=16, min_steps=0), seed=0)\n"
        "order = torch.randperm(16, generator=torch.Generator().manual_seed(0))\n"
        "share = order[distributed.rank()::2].double().mean()\n"
        "assert abs(model[0].running_mean.item() - share) < 1e-5, (model[0].running_mean, share)\n"
        "distributed.stop()\n")
    run = torchrun(str(script))
    assert run.returncode == 0, run.stdout + run.stderr


LOAD_IN_TURNS = """
import gzip, sys, time
from pathlib import Path
import numpy as np
import torch
from ballot import data, distributed
from ballot.config import DataConfig

distributed.start(torch.device("cpu"))
folder, outcome = Path(sys.argv[1]), sys.argv[2]
rank, read_idx = distributed.rank(), data._read_idx
log = open(folder / f"events{rank}.txt", "w", buffering=1)

def download(cfg):  # stands for torchvision's: slow, and writes the files at the end
    log.write(f"download {time.time()}\\n")
    time.sleep(1.0)
    if outcome != "succeed":  # a user's problem, or any other
        raise data.DatasetError("the network is down") if outcome == "refuse" else OSError("the disk is full")
    raw = Path(cfg.root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for key, name in data.FASHION_FILES.items():
        array = np.arange(20, dtype=np.uint8) % 10 if key.endswith("y") else np.zeros((20, 28, 28), np.uint8)
        header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
        with gzip.open(raw / name, "wb") as handle:
            handle.write(header + array.tobytes())
    log.write(f"downloaded {time.time()}\\n")
    return raw

def read(path):
    log.write(f"read {time.time()}\\n")
    return read_idx(path)

data._download_fashion_mnist, data._read_idx, data.DEBIAN_FASHION_DIR = download, read, folder / "absent"
try:
    bundle = data.load_data("fashion-mnist", DataConfig(root=str(folder / "root")))
    log.write(f"loaded {len(bundle.train)}\\n")
except Exception as error:
    log.write(f"raised {type(error).__name__}: {error}\\n")
distributed.stop()
"""


def _events(folder: Path, rank: int) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in (folder / f"events{rank}.txt").read_text().splitlines()]


def test_rank_0_downloads_the_data_before_the_others_load_it(tmp_path):
    (tmp_path / "load.py").write_text(LOAD_IN_TURNS)
    run = torchrun(str(tmp_path / "load.py"), str(tmp_path), "succeed")
    assert run.returncode == 0, run.stdout + run.stderr
    first, second = _events(tmp_path, 0), _events(tmp_path, 1)
    assert [event for event, _ in first] == ["download", "downloaded", *["read"] * 4, "loaded"], first
    assert [event for event, _ in second] == [*["read"] * 4, "loaded"], "rank 1 downloads nothing, reads the files"
    assert float(second[0][1]) > float(first[-2][1]), "rank 1 starts reading after rank 0 read the last file"
    assert first[-1] == second[-1] == ("loaded", "10")


@pytest.mark.parametrize("outcome,raised,shared", [
    ("refuse", "DatasetError: the network is down", "UserError: the network is down"),
    ("crash", "OSError: the disk is full", "DistributedError: rank 0 failed: OSError: the disk is full")])
def test_a_failed_download_on_rank_0_stops_the_others_with_its_error(tmp_path, outcome, raised, shared):
    (tmp_path / "load.py").write_text(LOAD_IN_TURNS)
    run = torchrun(str(tmp_path / "load.py"), str(tmp_path), outcome)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _events(tmp_path, 0) == [("download", _events(tmp_path, 0)[0][1]), ("raised", raised)]
    assert _events(tmp_path, 1) == [("raised", shared)], "rank 1 neither waits nor loads"


def test_bad_input_found_by_the_processes_exits_2_with_one_error_line_last(tmp_path):
    run = prune(tmp_path / "npz", "--method", "lth", "--nproc", "2", "--set", "base.dataset=npz",
                "--set", f"data.path={tmp_path / 'absent.npz'}")
    assert run.returncode == 2
    assert run.stderr.count("ballot: error:") == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"ballot: error: npz: file '{tmp_path / 'absent.npz'}' not found"


SITE_RANK_1_FAILS = """
import os
if os.environ.get("RANK") == "1":  # this test's stand-in for bad input that only rank 1 meets
    from ballot import experiment
    from ballot.errors import StorageError
    def prepare_data(cfg):
        raise StorageError("only rank 1 cannot read its data")
    experiment.prepare_data = prepare_data
"""


def test_bad_input_only_rank_1_meets_exits_2_with_its_error_line_last(tmp_path):
    """Rank 1 is made to fail through a sitecustomize module that only its interpreter acts on."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE_RANK_1_FAILS)
    root = str(Path(__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, "-m", "ballot.cli", "prune", *FLAGS, "--method", "lth", "--nproc", "2",
                          "--out", str(tmp_path / "out")], env={**ENV, "PYTHONPATH": f"{tmp_path / 'site'}:{root}"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("ballot: error:") == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "ballot: error: only rank 1 cannot read its data"


def test_methods_with_their_own_loop_refuse_several_processes(tmp_path):
    refusal = "'safecompress' trains in its own loop and runs in one process only"
    run = prune(tmp_path / "sc", "--method", "safecompress", "--nproc", "2")
    assert run.returncode == 2
    assert refusal in run.stderr
    by_hand = torchrun("-m", "ballot.cli", "prune", *FLAGS, "--method", "safecompress", "--out", str(tmp_path / "sc"))
    assert by_hand.returncode != 0
    assert by_hand.stderr.count("ballot: error:") == 1 and refusal in by_hand.stderr, by_hand.stderr
