"""Ranks under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``), as
nanoGPT does it, and the device each rank computes on.

On CUDA each rank owns GPU ``LOCAL_RANK`` (``torch.cuda.set_device``) and the process group is NCCL,
bound to that device (``device_id``); on the CPU it is gloo. ``--device auto`` means CUDA when torch
sees a GPU. Results are reproducible (same seed, same numbers) on the CPU; on CUDA only with
:func:`deterministic` (see the README's "Reproducibility").
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

TIMEOUT = datetime.timedelta(hours=12)  # a rank may wait this long at a collective (rank 0 validating, assembling)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this node
    owner: bool = False  # this process joined the process group in setup(), and teardown() leaves it

    @property
    def main(self) -> bool:
        """Only rank 0 logs, shows progress and writes the final outputs."""
        return self.rank == 0


def ranks() -> Dist:
    """This process's place under the launcher (one rank of one when not launched by ``torchrun``)."""
    env = os.environ
    return Dist(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")),
                int(env.get("LOCAL_WORLD_SIZE", "1")))


class DeviceError(UserError, ValueError):
    """A device asked for that this machine does not have."""


def device_for(choice: str, info: Dist) -> torch.device:
    """``auto`` picks this rank's GPU when CUDA is available, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: torch sees no CUDA device here (no GPU, no driver, CUDA_VISIBLE_DEVICES "
                              "empty, or a CPU-only torch build); use --device cpu")
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(choice: str = "auto") -> tuple[Dist, torch.device]:
    """Read the launcher's environment, pick this rank's device (``auto`` | ``cpu`` | ``cuda``) and,
    with more than one rank, join the process group: NCCL bound to the rank's GPU, gloo on the CPU."""
    info = ranks()
    device = device_for(choice, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.world > 1 and not dist.is_initialized():  # a group the caller made is used, and left to the caller
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        info = dataclasses.replace(info, owner=True)
    return info, device


def deterministic(enabled: bool) -> None:
    """CUDA's deterministic mode: deterministic kernels where torch has them (a warning names any op
    without one), cuBLAS's fixed workspace, no cuDNN autotuning. Call before the first CUDA op."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def allow_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls when ``enabled`` (faster on Ampere and later, ~1e-3 relative error);
    otherwise torch's defaults stay: float32 matmuls, TF32 in cuDNN's convolutions and RNNs."""
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = True


def smallest(value: int, device: torch.device) -> int:
    """The smallest ``value`` over the ranks: one collective (on ``device``: NCCL's are on the GPU)
    that every rank must call together."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown(info: Dist) -> None:
    """Leave the process group if :func:`setup` joined it."""
    if info.owner and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for on the CPU), before timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
