"""Data parallelism over torch.distributed (docs/scale.md): the process group torchrun describes, rank helpers.

Every helper is a no-op in a single process, so the training code calls them unconditionally. The group is started
from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL when the training
device is a GPU, gloo on CPUs.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

from ballot.errors import ConfigError, UserError
from ballot.processes import terminate_with_launcher

T = TypeVar("T")
# How long a collective waits for the other processes: gloo's default, given to NCCL too (whose own is 10 minutes),
# so the ranks waiting in ``in_turns`` outlast rank 0's dataset download.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class DistributedError(RuntimeError):
    """The processes of one run disagree (e.g. on a mask), another process failed, or the group cannot start."""


def requested_processes() -> int:
    """How many processes torchrun started for this run (WORLD_SIZE; 1 when not started by torchrun). ConfigError
    when WORLD_SIZE is not a count, or asks for several processes without the rest of torchrun's environment (a
    variable left over in a shell)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        processes = int(value)
    except ValueError:
        processes = 0
    if processes < 1:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a number of processes; unset it (ballot prune --nproc N "
                          "starts the processes itself)")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if processes > 1 and missing:
        raise ConfigError(f"WORLD_SIZE={value} is set but {', '.join(missing)} not, as torchrun would; unset "
                          "WORLD_SIZE (ballot prune --nproc N starts the processes itself)")
    return processes


def requested() -> bool:
    """Whether this process was started as one of several."""
    return requested_processes() > 1


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes outputs and shows progress."""
    return rank() == 0


def local_rank() -> int:
    """This process's number on its machine (torchrun's LOCAL_RANK; RANK where that is not set, else 0)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def local_device(device: torch.device) -> torch.device:
    """This process's GPU (cuda:LOCAL_RANK) when ``device`` is a GPU and several processes run; else ``device``."""
    if device.type == "cuda" and requested():
        return torch.device("cuda", local_rank())
    return device


def start(device: torch.device) -> None:
    """Join the process group torchrun describes (no-op in a single process or when already joined); this process
    then ends with torchrun, however torchrun ends (it starts each worker in a session of its own), and at once
    when ``ballot prune --nproc``'s torchrun ended while this process started up."""
    if not requested() or dist.is_initialized():
        return
    terminate_with_launcher()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)


def stop() -> None:
    """Leave the process group (no-op when none runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where the group's collectives take their tensors: this process's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place; returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s, in place; returns it."""
    if active():
        dist.broadcast(tensor, src)
    return tensor


def digest(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 of the tensors' names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.digest()


def check_identical(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise DistributedError unless every process holds the same ``tensors`` (compared by SHA-256 digests,
    gathered as tensors: nothing is pickled)."""
    if not active():
        return
    mine = torch.tensor(list(digest(tensors)), dtype=torch.uint8)
    device = _collective_device()
    gathered = [torch.empty_like(mine, device=device) for _ in range(world_size())]
    dist.all_gather(gathered, mine.to(device))
    differing = [r for r, theirs in enumerate(gathered) if not torch.equal(theirs.cpu(), mine)]
    if differing:
        raise DistributedError(f"{what} differs between rank {rank()} and rank(s) {differing}")


def _first_failure(error: Exception | None) -> tuple[int, bool, str] | None:
    """(rank, whether it is a UserError, message) of the lowest-ranked process whose ``error`` is not None, the
    same on every process; None when every ``error`` is None. Every process must call it."""
    device, mine_is_user = _collective_device(), isinstance(error, UserError)
    text = b"" if error is None else (str(error) if mine_is_user else f"{type(error).__name__}: {error}").encode()
    mine = torch.tensor([-1 if error is None else len(text), mine_is_user], device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    failed = [(r, size, bool(user)) for r, (size, user) in enumerate(t.tolist() for t in gathered) if size >= 0]
    if not failed:
        return None
    source, size, user = failed[0]
    message = torch.tensor(list(text), dtype=torch.uint8) if rank() == source else torch.empty(size, dtype=torch.uint8)
    return source, user, bytes(broadcast(message.to(device), source).cpu().tolist()).decode()


def in_turns(work: Callable[[], T]) -> T:
    """``work()`` on rank 0, then on the first process of each other machine, then on the rest (one call in a
    single process): a download into a folder the processes share is made once, and no process reads files
    another is still writing. When ``work`` fails on some process, every process stops after that turn: the
    failing ones raise their own error, the others the lowest failing rank's message, as a UserError when that
    error was one (so each exits like it) and as a DistributedError otherwise."""
    if not active():
        return work()
    mine = 0 if rank() == 0 else 1 if local_rank() == 0 else 2
    result: list[T] = []
    for turn in range(3):
        error: Exception | None = None
        if turn == mine:
            try:
                result.append(work())
            except Exception as caught:  # shared with the others below, then raised again
                error = caught
        failure = _first_failure(error)
        if error is not None:
            raise error
        if failure is not None:
            source, user, message = failure
            raise UserError(message) if user else DistributedError(f"rank {source} failed: {message}")
    return result[0]
