"""Child processes end with their launchers: the stop rule every launcher shares, and a torchrun worker that starts
up after its launcher has gone (real subprocesses)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from ballot.processes import LAUNCHER_ENV, stop_children
from tests.proc import needs_proc_children

SLEEPER = "import signal, sys, time\n{setup}\nprint('ready', flush=True)\ntime.sleep({seconds})\n"


def sleeper(setup: str = "", seconds: float = 60) -> subprocess.Popen:
    """A python child that runs ``setup``, says it is ready and sleeps."""
    child = subprocess.Popen([sys.executable, "-c", SLEEPER.format(setup=setup, seconds=seconds)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    return child


def test_a_child_that_stops_by_itself_is_not_signalled():
    child = sleeper(seconds=0.5)
    stop_children([child], self_stop_s=10, grace_s=10)
    assert child.returncode == 0


def test_a_child_that_does_not_stop_gets_sigterm_after_its_self_stop_time():
    child = sleeper()
    started = time.monotonic()
    stop_children([child], self_stop_s=0.5, grace_s=10)
    assert child.returncode == -signal.SIGTERM
    assert time.monotonic() - started >= 0.5


def test_a_child_that_ignores_sigterm_gets_sigkill_after_the_grace():
    stubborn = sleeper("signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    polite = sleeper()
    stop_children([stubborn, polite], self_stop_s=0, grace_s=1)
    assert (stubborn.returncode, polite.returncode) == (-signal.SIGKILL, -signal.SIGTERM)


def test_multiprocessing_children_are_stopped_by_the_same_rule():
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    child.start()
    stop_children([child], self_stop_s=0, grace_s=10)
    assert child.exitcode == -signal.SIGTERM


WORKER = ("import torch\n"
          "from ballot import distributed\n"
          "distributed.start(torch.device('cpu'))\n"
          "print('joined', flush=True)\n")


@needs_proc_children
def test_a_torchrun_worker_whose_launcher_has_gone_stops_before_joining_the_group():
    """The worker's parent is not the launcher named in BALLOT_LAUNCHER_PID (it died while the worker imported
    torch, and the worker was handed to another parent): the worker stops at once, naming why, instead of waiting
    at the rendezvous for the rest of the group."""
    environment = {**os.environ, LAUNCHER_ENV: "0", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}
    worker = subprocess.run([sys.executable, "-c", WORKER], env=environment, capture_output=True, text=True,
                            timeout=120)
    assert worker.returncode == -signal.SIGTERM, worker.stderr
    assert f"ballot: the launcher of this process (pid 0, named by {LAUNCHER_ENV}) has ended" in worker.stderr
    assert "joined" not in worker.stdout


@pytest.mark.parametrize("launcher", ["parent", None])
def test_a_worker_whose_launcher_runs_goes_on(launcher):
    """BALLOT_LAUNCHER_PID naming the worker's parent, or absent (a torchrun started by hand): no stop."""
    environment = {key: value for key, value in os.environ.items() if key != LAUNCHER_ENV}
    if launcher == "parent":
        environment[LAUNCHER_ENV] = str(os.getpid())
    script = "from ballot.processes import terminate_with_launcher\nterminate_with_launcher()\nprint('on')\n"
    worker = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=60)
    assert (worker.returncode, worker.stdout, worker.stderr) == (0, "on\n", "")
