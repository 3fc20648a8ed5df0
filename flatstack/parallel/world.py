"""This process's place among the ranks, and the process group: NCCL on GPUs, gloo on CPUs, joined with a
timeout so that a rank that fails brings the job down with its own error instead of leaving the others
waiting in a collective for ever."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that logs, prints and writes what is not sharded."""
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun (even as one rank: then the job shards over its one process too)."""
    return "WORLD_SIZE" in os.environ


def world() -> World:
    """This process's place, from torchrun's environment (one process: rank 0 of 1)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def setup(device: torch.device, timeout_s: float) -> World:
    """Join the process group when torchrun started this process; on GPUs, each rank takes its local device."""
    w = world()
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return w


def rank_device(device: torch.device, w: World) -> torch.device:
    return torch.device("cuda", w.local_rank) if device.type == "cuda" and launched() else device


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (values as they are on one process)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave() -> None:
    """Destroy the process group (and the meshes' groups) once the job is done: gloo's threads left to the
    interpreter's exit can abort it ("terminate called without an active exception")."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
