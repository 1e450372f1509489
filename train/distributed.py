"""Data-parallel training under torchrun: who this process is, and the few collectives the loop needs.

    torchrun --standalone --nproc-per-node 2 -m train --out runs/ddp ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (and MASTER_ADDR/PORT); without them a run is
one process and every collective here is the identity, so the single-process loop pays nothing. Backend:
nccl on CUDA, gloo on the CPU. Every rank runs the same steps: anything that decides whether to take a step
(a stop signal, the time budget, a non-finite loss) is all-reduced first, so no rank waits on one that left.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT = dt.timedelta(minutes=5)  # a rank gone for this long fails the others instead of hanging them


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and plots, and reports."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous part of n items (the first n % size ranks take one more)."""
        base, extra = divmod(n, self.size)
        lo = self.rank * base + min(self.rank, extra)
        return slice(lo, lo + base + (self.rank < extra))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def gather(self, obj: object) -> list:
        """Every rank's obj, in rank order, on every rank (tensors travel moved to the CPU)."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's obj on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def from_env() -> World:
    """The world torchrun describes in the environment (one process when it describes none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", str(size))))


def start(world: World, device: torch.device) -> None:
    """Join the process group (nccl for CUDA, else gloo); a no-op for one process."""
    if world.size == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)


def stop(world: World, *, finished: bool) -> None:
    """Leave the process group. A rank that finished waits for the others first: one that tore gloo down
    and exited while rank 0 was still writing the last checkpoint aborted ("terminate called without an
    active exception") in 2 of 10 two-process runs, and 0 of 30 with the barrier. A rank leaving on an error
    skips it, since the others may be inside another collective; torchrun stops them when this one exits."""
    if world.size > 1 and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def default_threads(world: World) -> int:
    """Torch threads per process: the cores shared out among this node's ranks; one process keeps half the
    cores: OpenMP threads that share a core with other work spin-wait (on 2 cores, 2 threads trained 1.39x
    faster than 1 alone and 2.6x slower than 1 beside one busy process: bench/train.py --grid)."""
    cores = os.cpu_count() or 2
    return max(1, cores // 2 if world.local_size == 1 else cores // world.local_size)


ONE = World()  # a single process: every collective is the identity
