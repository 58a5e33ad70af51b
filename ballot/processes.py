"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def terminate_with_parent(parent: int | None = None) -> None:
    """Ask Linux to send this process SIGTERM when its parent dies, however it dies (elsewhere a no-op). ``parent``:
    the parent's pid when it started this process; when that parent has gone already, the SIGTERM comes now."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl: not Linux
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> None:
    """``python -m ballot.processes PARENT_PID MODULE [ARGS...]``: run MODULE as ``python -m`` would, ending with
    process PARENT_PID (a launcher asks for this in the child itself, not in a ``preexec_fn`` between fork and exec,
    which is unsafe in a threaded parent)."""
    parent, module, *arguments = argv
    terminate_with_parent(int(parent))
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
