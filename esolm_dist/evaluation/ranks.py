"""Several processes (torchrun or srun) share one evaluation: each draws its batches, rank 0 gathers them.

The group is gloo whatever the device: only Python objects (tokens, NLLs, timings) travel.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def init_ranks() -> tuple[int, int]:
    """(rank, world size): from torchrun's RANK / WORLD_SIZE or srun's SLURM_PROCID / SLURM_NTASKS
    (rendezvous at MASTER_ADDR:MASTER_PORT), joined into one gloo group when the world has several."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def gather_to_first(items: list, world: int) -> list | None:
    """Every rank's list, concatenated in rank order, on rank 0 (None elsewhere)."""
    if world == 1:
        return items
    gathered = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return None if gathered is None else [item for part in gathered for item in part]


def close_ranks(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
