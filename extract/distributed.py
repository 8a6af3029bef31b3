"""Rank detection for ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``), as nanoGPT does it."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only rank 0 logs, shows progress and writes the final outputs."""
        return self.rank == 0


def setup(backend: str = "gloo") -> Dist:
    """Read the launcher's environment and join the process group when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    return info


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for on the CPU), before timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_for(choice: str, info: Dist) -> torch.device:
    """``auto`` picks this rank's GPU when CUDA is available, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")
