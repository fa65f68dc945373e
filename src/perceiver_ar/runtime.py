"""Where and how a process computes: device, autocast precision, CPU threads, process group.

Decided once per process by ``setup_runtime`` and then only read: training,
``perceiver-ar eval``, ``generate`` and ``render`` all take their ``Runtime``
from here. This is the one module that asks torch whether CUDA is available
(a test scans the package for any other caller).

``OMP_WAIT_POLICY`` is not set here: it must be set before torch is first
imported, and the package's ``__init__`` runs before any of its modules
import torch, so that is the one place it is set.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class Runtime:
    """The decided policy of one process."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False  # this process joined it, so it leaves it in ``close``

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def precision(self) -> str:
        return "bf16 autocast" if self.autocast_dtype is not None else "fp32"

    def autocast(self) -> AbstractContextManager:
        """The autocast context of this precision (a no-op in fp32)."""
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

    def close(self) -> None:
        """Leave the process group if this runtime joined it (after every rank got here)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()  # nobody leaves before rank 0 has written its last files
        if self.owns_process_group:
            dist.destroy_process_group()
            self.owns_process_group = False


def setup_runtime(
    device: str | None = "auto",
    precision: str = "auto",
    threads: int | None = None,
    distributed: bool = False,
) -> Runtime:
    """Pick the device, precision and CPU threads; with ``distributed``, join torchrun's process group.

    ``device``: "auto" (or None: CUDA when available, else the CPU), "cpu", "cuda" (under torchrun,
    this process's local GPU) or "cuda:N". ``precision``: "auto" means bf16 autocast on a CUDA device
    that supports it and fp32 otherwise. ``threads`` (CPU only): None leaves torch's own choice,
    0 shares the cores between the processes of this machine, N sets N.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))) if distributed else 1
    name = device or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available: use --device cpu")
        dev = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
        torch.cuda.set_device(dev)
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
        if threads is not None:
            # Share the cores between the local processes; more threads than cores thrash.
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, torch.bfloat16 if precision == "bf16" else None, rank, world_size, owns)
