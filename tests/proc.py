"""Processes as Linux's /proc shows them, for tests that check no child outlives its parent."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

needs_proc_children = pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                                         reason="reads child processes from /proc (Linux)")


def children(pid: int) -> set[int]:
    """The child processes of ``pid``'s main thread."""
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


def naming(text: str) -> list[int]:
    """Pids of the running processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in command and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def survivors(pids: set[int] | list[int], within_s: float) -> list[int]:
    """Those of ``pids`` still running once all have ended or ``within_s`` seconds have passed."""
    deadline = time.monotonic() + within_s
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left
