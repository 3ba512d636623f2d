"""DDP set-up from torchrun's environment: gloo on the CPU, nccl on CUDA; rank 0 writes records."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1   # processes on this node: they share its cores
    control: object = None      # a CPU (gloo) group for host-side votes; None: the default group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if not self.enabled:
            return lambda t: t

        def reduce(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t
        return reduce


def gather_per_rank(d: Dist, mine) -> list:
    """Every rank's `mine`, in rank order (a collective: every rank calls it)."""
    if not d.enabled:
        return [mine]
    states: list = [None] * d.world_size
    dist.all_gather_object(states, mine)
    return states


def init_distributed(device_choice: str) -> tuple[Dist, torch.device]:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun); pick the device; start the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
    if use_cuda and not torch.cuda.is_available():
        from .errors import RunError
        raise RunError("run.device = 'cuda' but torch sees no CUDA device")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                store=attempt_store(rank=rank, world_size=world))
    control = dist.new_group(backend="gloo") if world > 1 and use_cuda else None
    return Dist(rank=rank, world_size=world, local_rank=local, local_world_size=local_world, control=control), device


def attempt_store(*, rank: int, world_size: int):
    """The rendezvous store of this attempt of the worker group, under a prefix of its own.

    torchrun (its default c10d rendezvous shares the agent's TCPStore with the workers) keeps one store
    for the whole job: when a worker dies and the group is restarted, the store still holds the keys the
    dead group wrote (each rank's gloo/nccl address, barrier counters). Workers of the new attempt that
    joined on the raw store read those stale keys: they connect to the dead workers' ports ("Connection
    refused") or wait on counters that never add up. TORCHELASTIC_RESTART_COUNT, which torchrun sets per
    attempt, keys a prefix, so every attempt starts on clean keys."""
    from torch.distributed.rendezvous import rendezvous
    store, _, _ = next(rendezvous("env://", rank, world_size))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"fastrefine/attempt-{attempt}/", store)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
