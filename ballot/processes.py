"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def terminate_with_parent(parent: int | None = None) -> None:
    """Ask Linux to send this process SIGTERM when its parent dies, however it dies (elsewhere a no-op). ``parent``:
    the parent's pid when it started this process; when that parent has gone already, the SIGTERM comes now."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl: not Linux
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
