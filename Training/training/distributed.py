"""Several processes (GPUs or nodes) through ``torchrun``: DistributedDataParallel set-up.

``torchrun --nproc-per-node N -m Training train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads them and starts the
process group (NCCL on CUDA, gloo on CPU). Without them, training runs in one process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` picks the local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            from Training.config import ConfigError

            raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU on this machine.")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        device = torch.device(name)
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def setup(device_name: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun (or with RANK/WORLD_SIZE set)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_name, local_rank)
    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        initialized_here = True
        logger.info("Process %d of %d on %s (%s).", rank, world_size, device, backend)
    return DistInfo(rank, world_size, local_rank, device, initialized_here)


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over all processes (identity in one process)."""
    if not info.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's decision, on every rank (e.g. stop on a time limit)."""
    if not info.distributed:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=info.device)
    dist.broadcast(tensor, 0)
    return bool(tensor.item())


def gather_objects(obj: object, info: DistInfo) -> list:
    """Every process's ``obj``, in rank order (a one-element list in one process)."""
    if not info.distributed:
        return [obj]
    result: list = [None] * info.world_size
    dist.all_gather_object(result, obj)
    return result


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def free_port() -> int:
    """A free TCP port on this machine (for a local process group)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawned(rank: int, world_size: int, port: int, config: object, results: object) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch as _torch

    _torch.set_num_threads(1)
    from Training.training.train import run

    result = run(config)  # type: ignore[arg-type]
    results[rank] = result.best_val_dice  # type: ignore[index]


def spawn_local(config: object, world_size: int = 2) -> list[float]:
    """Run :func:`Training.training.train.run` in ``world_size`` local processes (gloo on CPU), as torchrun
    would; returns each rank's best validation Dice. Used by the tests; on GPUs prefer torchrun."""
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_spawned, args=(world_size, free_port(), config, results), nprocs=world_size, join=True)
    return [results[r] for r in range(world_size)]
