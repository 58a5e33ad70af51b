"""Data parallelism over torch.distributed (docs/scale.md): the process group torchrun describes, rank helpers.

Every helper is a no-op in a single process, so the training code calls them unconditionally. The group is started
from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL when the training
device is a GPU, gloo on CPUs.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """The processes of one run disagree (e.g. on a mask), or the group cannot start."""


def requested_processes() -> int:
    """How many processes torchrun started for this run (WORLD_SIZE; 1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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


def local_device(device: torch.device) -> torch.device:
    """This process's GPU (cuda:LOCAL_RANK) when ``device`` is a GPU and several processes run; else ``device``."""
    if device.type == "cuda" and requested():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def start(device: torch.device) -> None:
    """Join the process group torchrun describes (no-op in a single process or when already joined)."""
    if not requested() or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop() -> None:
    """Leave the process group (no-op when none runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    gathered = [torch.empty_like(mine, device=device) for _ in range(world_size())]
    dist.all_gather(gathered, mine.to(device))
    differing = [r for r, theirs in enumerate(gathered) if not torch.equal(theirs.cpu(), mine)]
    if differing:
        raise DistributedError(f"{what} differs between rank {rank()} and rank(s) {differing}")
