"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import subprocess
import sys
import time
from multiprocessing.process import BaseProcess
from typing import Sequence

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LAUNCHER_ENV = "BALLOT_LAUNCHER_PID"  # set by ``main`` for the processes its module starts (torchrun's workers)


def terminate_with_parent(parent: int | None = None) -> None:
    """Ask Linux to send this process SIGTERM when its parent dies, however it dies (elsewhere a no-op). ``parent``:
    the parent's pid when it started this process; when that parent has gone already, the SIGTERM comes now."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl: not Linux
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def terminate_with_launcher() -> None:
    """``terminate_with_parent`` for a process that the module ``main`` ran started (a torchrun worker): the parent
    must be that launcher, whose pid ``main`` left in BALLOT_LAUNCHER_PID, so a launcher that died while this
    process was starting up ends it now. Without the variable (a torchrun started by hand) the parent is whichever
    process started this one."""
    launcher = os.environ.pop(LAUNCHER_ENV, None)  # this process's own children have another parent
    expected = os.getppid() if launcher is None else int(launcher) if launcher.isdigit() else -1
    if expected != os.getppid():
        print(f"ballot: the launcher of this process (pid {launcher}, named by {LAUNCHER_ENV}) has ended; stopping",
              file=sys.stderr, flush=True)
    terminate_with_parent(expected)  # compares again once Linux has been asked: a launcher dying meanwhile counts


def _ended(child: subprocess.Popen | BaseProcess, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds (None: for as long as it takes) for ``child`` to end; whether it has."""
    if isinstance(child, subprocess.Popen):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout)
        return child.poll() is not None
    child.join(timeout)
    return not child.is_alive()


def stop_children(children: Sequence[subprocess.Popen | BaseProcess], self_stop_s: float, grace_s: float) -> None:
    """Stop interrupted child processes, the one rule of every launcher here: a terminal's Ctrl-C reached them too,
    so they are first given ``self_stop_s`` seconds (all together) to stop by themselves; then the ones left get
    SIGTERM, and SIGKILL after ``grace_s`` more. Returns once every child has ended; a second Ctrl-C meanwhile skips
    to the SIGKILL."""
    def until(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    try:
        deadline = time.monotonic() + self_stop_s
        running = [child for child in children if not _ended(child, until(deadline))]
        for child in running:
            child.terminate()
        deadline = time.monotonic() + grace_s
        for child in running:
            _ended(child, until(deadline))
    finally:
        stubborn = [child for child in children if not _ended(child, 0)]
        for child in stubborn:
            child.kill()
        for child in stubborn:
            _ended(child, None)


def main(argv: list[str]) -> None:
    """``python -m ballot.processes PARENT_PID MODULE [ARGS...]``: run MODULE as ``python -m`` would, ending with
    process PARENT_PID (a launcher asks for this in the child itself, not in a ``preexec_fn`` between fork and exec,
    which is unsafe in a threaded parent). The processes MODULE starts find this process's pid in
    BALLOT_LAUNCHER_PID (``terminate_with_launcher``)."""
    parent, module, *arguments = argv
    terminate_with_parent(int(parent))
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
