"""Leftovers of killed writers: removed by the next writer, and a half-swapped folder put back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ballot.errors import StorageError
from ballot.storage import staged_folder, write_text


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_writer_removes_what_a_killed_writer_left_and_spares_a_live_ones(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    (tmp_path / f".run.{dead}.abc.tmp").mkdir()
    (tmp_path / f".run.{dead}.abc.tmp" / "model.safetensors").write_text("half")
    (tmp_path / f".metrics.json.{dead}.xyz.tmp").write_text("{")
    (tmp_path / f".run.{live}.def.tmp").mkdir()
    with staged_folder(tmp_path / "run") as folder:
        (folder / "done").write_text("yes")
    write_text(tmp_path / "metrics.json", "{}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".run.{live}.def.tmp", "metrics.json", "run"]


def test_a_folder_output_never_replaces_a_file(tmp_path):
    """Swapping a file out of the way would leave it as a leftover, which the next writer deletes."""
    notes = tmp_path / "notes.txt"
    notes.write_text("a user's file")
    with pytest.raises(StorageError, match="is not a folder"):
        with staged_folder(notes):
            pass
    assert notes.read_text() == "a user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_kill_between_the_two_renames_leaves_the_old_folder_restored(tmp_path):
    dead = _dead_pid()
    old = tmp_path / f".run.{dead}.abc.old"  # the old 'run', moved aside; the new one never arrived
    old.mkdir()
    (old / "mask.safetensors").write_text("old mask")
    with staged_folder(tmp_path / "run") as folder:
        assert (tmp_path / "run" / "mask.safetensors").read_text() == "old mask", "restored before anything else"
        (folder / "mask.safetensors").write_text("new mask")
    assert (tmp_path / "run" / "mask.safetensors").read_text() == "new mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_siblings_temp_files_are_not_taken_for_leftovers(tmp_path):
    dead = _dead_pid()
    sibling = tmp_path / f".run.20240101.{dead}.abc.old"  # run.20240101's writer, killed mid-swap
    sibling.mkdir()
    (sibling / "f").write_text("old state of run.20240101")
    live = tmp_path / f".run.20240101.{os.getpid()}.def.tmp"  # run.20240101's writer at work
    live.mkdir()
    with staged_folder(tmp_path / "run") as folder:
        (folder / "f").write_text("run")
    assert (tmp_path / "run" / "f").read_text() == "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([sibling.name, live.name, "run"])


KILLED_AFTER_THE_FIRST_MOVE = """
import os, signal, sys
from pathlib import Path
from ballot import storage

def then_die(move):
    def moved_then_killed(*args):
        result = move(*args)
        os.kill(os.getpid(), signal.SIGKILL)
        return result
    return moved_then_killed

os.replace, os.rename = then_die(os.replace), then_die(os.rename)
storage._exchange = then_die(storage._exchange)
with storage.staged_folder(Path(sys.argv[1])) as folder:
    (folder / "f").write_text("new")
"""


def test_a_kill_right_after_the_first_move_of_the_swap_leaves_the_new_folder_in_place(tmp_path):
    """The swap is one step: killed at its first move (of whichever kind), the folder is there and is the new one,
    where two renames would have left it missing."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "f").write_text("old")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_THE_FIRST_MOVE, str(tmp_path / "run")], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "run" / "f").read_text() == "new"
