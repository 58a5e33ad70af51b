"""Leftovers of killed writers: removed by the next writer, and a half-swapped folder put back."""

from __future__ import annotations

import os
import subprocess
import sys

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
