"""Where a process runs: its device, and its rank in a (possibly single-process) DistributedDataParallel job.

    d = setup_distributed("auto")        # Dist(rank, world, local_rank, device); DDP when torchrun set it up
    value = broadcast(value, d)          # rank 0's value everywhere
    out = gather_predictions(out, d)     # every rank's predictions, once each, in split order
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(UserError):
    """--device cuda on a machine where torch sees no CUDA device."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without CUDA is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


@dataclass
class Dist:
    """Where this process sits in a (possibly single-process) job."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Single process, or DDP when torchrun set WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    cuda = resolve_device(device).type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank,
                device=torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def broadcast(obj, d: Dist):
    """rank 0's value of a picklable object on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_predictions(out: dict, d: Dist) -> dict:
    """Concatenate every rank's predictions, drop DistributedSampler's padding duplicates, order by index."""
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, out)
        out = {k: np.concatenate([p[k] for p in parts]) for k in out}
    _, first = np.unique(out["index"], return_index=True)  # sorted unique positions, first occurrence
    return {k: v[first] for k, v in out.items()}
