"""Atomic file writes and pickle-free tensor files."""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ballot.errors import StorageError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot, /proc/<pid>/stat field 22), so that a pid reused
    by a later process is told apart; None where it cannot be read (no such process, no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the name in parentheses may hold spaces; fields 3.. follow it


def _prefix(path: Path) -> str:
    """Temp names beside ``path`` carry the writer's pid, so a later writer knows which are leftovers."""
    return f".{path.name}.{os.getpid()}."


def _leftover_pattern(path: Path) -> re.Pattern[str]:
    """The names ``_prefix`` + mkstemp's random part (no dots) + ``.tmp`` / ``.old``, and no sibling's names:
    ``.run.20240101.<pid>.<random>.tmp`` belongs to ``run.20240101``, not to ``run``."""
    return re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[A-Za-z0-9_]+\.(tmp|old)")


def clear_leftovers(path: Path) -> None:
    """Remove the temp files and folders a killed writer of ``path`` left beside it; if it was killed between
    moving the old ``path`` aside and moving the new one in, put the old one back (so ``path`` is always the old
    or the new state)."""
    pattern = _leftover_pattern(path)
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.*")):
        match = pattern.fullmatch(leftover.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        if match.group(2) == "old" and not path.exists():
            os.replace(leftover, path)
        elif leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux renameat2 with RENAME_EXCHANGE, through libc: the standard library
    has no call for it); False where the platform or file system cannot, and nothing moved."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(error, os.strerror(error), str(a))


def file_in_the_way(folder: str | Path) -> Path | None:
    """``folder`` or the first of its parents that is a file (so no folder can be made there), if any."""
    folder = Path(folder)
    return next((path for path in (folder, *folder.parents) if path.is_file()), None)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """An empty temp folder beside ``final`` that takes ``final``'s place only if the block succeeds.

    On failure the temp folder is removed and ``final`` is left exactly as it was. The two are swapped in one step
    where the system allows (Linux), so a reader never finds ``final`` missing.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise StorageError(f"'{final}' is not a folder; a folder output would replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_prefix(final), suffix=".tmp"))
    old = tmp.with_suffix(".old")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
        if not final.exists():
            os.replace(tmp, final)
        elif not _exchange(tmp, final):  # two renames: a kill between them leaves .old, which clear_leftovers restores
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap, the old state


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path, missing: str) -> Any:
    """The JSON file at ``path``; StorageError with ``missing`` when it is absent, naming it when it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise StorageError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StorageError(f"'{path}' is not valid JSON: {error}") from None


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (NaN written as null)."""
    return write_text(path, json.dumps(_nan_to_none(data), indent=2, sort_keys=False) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                        metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` as a safetensors file; a tensor sharing memory with an earlier one (a weight
    tied to another layer's) is written as a copy of its own, which safetensors requires."""
    payload, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        payload[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return atomic_write(path, lambda tmp: save_file(payload, tmp, metadata=metadata))


def load_tensors(path: str | Path, what: str = "tensor file") -> dict[str, torch.Tensor]:
    """Read a safetensors file, with a clear error when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"{what} '{path}' not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise StorageError(f"{what} '{path}' is not a readable safetensors file: {error}") from None


def save_state(model: torch.nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Save a model's state dict (or a state dict) as safetensors."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    return atomic_save_tensors(state, path)


def load_state(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load safetensors weights into ``model``, naming missing or mismatched entries."""
    state = load_tensors(path, "weights")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise StorageError(f"weights '{path}' do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise StorageError(f"weights '{path}': '{name}' has shape {tuple(tensor.shape)}, "
                               f"the model expects {tuple(own[name].shape)}")
        if tensor.dtype != own[name].dtype:
            raise StorageError(f"weights '{path}': '{name}' is {tensor.dtype}, the model expects {own[name].dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise StorageError(f"weights '{path}': '{name}' holds NaN or infinite values")
    model.load_state_dict(state)
    return model
