"""Where and how a process computes: device, autocast precision, CPU threads, process groups and mesh.

Decided once per process by ``setup_runtime`` and then only read: training,
``perceiver-ar eval``, ``generate`` and ``render`` all take their ``Runtime``
from here. This is the one module that asks torch whether CUDA is available
(a test scans the package for any other caller).

A distributed run's processes form a ``DeviceMesh`` with named dimensions
``("dp", "cp")``: data parallel (each dp rank trains on its own slice of the
batch) and context parallel (the K ranks that share one row's inputs,
``context_parallel.py``). ``build_mesh`` is the one place the mesh is made.
DDP averages gradients over every rank; FSDP shards over ``fsdp_mesh`` (the
dp dimension, or the whole world flattened when rows are split).

``OMP_WAIT_POLICY`` is not set here: it must be set before torch is first
imported, and the package's ``__init__`` runs before any of its modules
import torch, so that is the one place it is set.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MESH_DIMS = ("dp", "cp")  # data parallel, context parallel
# The --precision help of the inference commands (eval, generate, render).
INFERENCE_PRECISION_HELP = (
    "auto (bf16 on a CUDA GPU that has it, else fp32), fp32, bf16 or fp16: the model is cast to it "
    "(default: auto)"
)


@dataclass
class Runtime:
    """The decided policy of one process."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False  # this process joined it, so it leaves it in ``close``
    # The world as a (dp, cp) grid when distributed: rank = dp_rank * cp_size + cp_rank, so the
    # cp_size processes that share each row (context parallelism) are neighbours.
    mesh: DeviceMesh | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def cp_size(self) -> int:
        """Processes that split each row's inputs between them (context parallelism; 1: off)."""
        return 1 if self.mesh is None else self.mesh["cp"].size()

    @property
    def cp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh["cp"].get_local_rank()

    @property
    def dp_size(self) -> int:
        """Groups that take different rows of the batch (data parallelism): world_size / cp_size."""
        return self.world_size // self.cp_size

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh["dp"].get_local_rank()

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The process group of this rank's row (context parallelism), None when off."""
        return None if self.cp_size == 1 else self.mesh.get_group("cp")

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The 1-D mesh FSDP shards over: the dp dimension, or with context parallelism every rank.

        The K ranks of a row hold gradients that must be summed (each has its
        slice's embedding gradients and 1/K of the replicated rest), as DDP
        over the whole world does: FSDP then shards over the whole world too.
        """
        assert self.mesh is not None, "FSDP needs a process group: setup_runtime(group_of_one=True)"
        return self.mesh["dp"] if self.cp_size == 1 else self.mesh["dp", "cp"]._flatten("dp_cp")

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank (a path rank 0 chose); as is without a process group.

        Sent as UTF-8 bytes in a tensor, so nothing is pickled.
        """
        if self.mesh is None:
            return text
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=self.device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=0)
        if int(size.item()) == 0:
            return ""
        buffer = (
            data if self.is_main else torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        )
        dist.broadcast(buffer, src=0)
        return bytes(buffer.cpu().tolist()).decode()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (the same answer on every rank)."""
        if self.mesh is None:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    @property
    def precision(self) -> str:
        if self.autocast_dtype == torch.float16:
            return "fp16 autocast + gradient scaler"
        return "bf16 autocast" if self.autocast_dtype is not None else "fp32"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: what an inference-only model is cast to (generation), fp32 by default."""
        return self.autocast_dtype or torch.float32

    def autocast(self) -> AbstractContextManager:
        """The autocast context of this precision (a no-op in fp32).

        Parameters, gradients and optimizer state stay fp32 (the master
        weights); matmuls and attention run in the low-precision dtype, while
        LayerNorm, the softmax statistics and the loss run in fp32 (model.py,
        attention.py, loss.py).
        """
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

    def fsdp_mixed_precision(self) -> MixedPrecisionPolicy:
        """FSDP's mixed precision for this precision: weights gathered in the compute dtype, gradients
        reduced in fp32.

        bf16 (the default on a GPU that has it): every rank keeps fp32 shards
        (the master weights and the optimizer state), FSDP gathers them as bf16
        for the forward and backward and reduce-scatters the gradients in fp32.
        fp32: fp32 throughout. Inputs are not cast (``cast_forward_inputs``
        off): autocast still runs around the forward, so the ops it keeps in
        fp32 and the fp32 rotary tables are as in the unsharded model.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy  # torch >= 2.6 (parallel.py checks)

        return MixedPrecisionPolicy(
            param_dtype=self.autocast_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )

    def for_inference(self, model: nn.Module) -> nn.Module:
        """``model`` on this device, cast to the compute dtype, in eval mode (eval, generate, render).

        Inference casts the weights once instead of autocasting: a decoded
        token reads every weight, and bf16 copies halve those bytes where
        autocast would re-cast fp32 weights. Training keeps fp32 master weights.
        """
        return model.to(device=self.device, dtype=self.dtype).eval()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled for fp16 only (its 5 exponent bits underflow small gradients).

        bf16 has fp32's exponent range and needs none; a disabled scaler
        passes the loss and the optimizer step through unchanged.
        """
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)

    def precision_note(self) -> str | None:
        """One line for the log when this precision runs emulated (slowly) on this machine, else None."""
        if self.device.type != "cpu" or self.autocast_dtype is None:
            return None
        if self.autocast_dtype == torch.bfloat16:
            name, native = "bf16", torch.ops.mkldnn._is_mkldnn_bf16_supported()
        else:
            name, native = "fp16", torch.ops.mkldnn._is_mkldnn_fp16_supported()
        if native:
            return None
        return (
            f"note: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native {name} matmul: "
            f"{name} runs emulated, many times slower than fp32 (use --precision fp32 on it)"
        )

    def close(self, wait: bool = True) -> None:
        """Leave the process group if this runtime joined it (with ``wait``, after every rank got here:
        not after an error, which the other ranks may never reach)."""
        if wait and self.world_size > 1 and dist.is_initialized():
            dist.barrier()  # nobody leaves before rank 0 has written its last files
        if self.owns_process_group:
            dist.destroy_process_group()
            self.owns_process_group = False


def build_mesh(device_type: str, world_size: int, context_parallel: int = 1) -> DeviceMesh:
    """Every process of the run as a (dp, cp) mesh: ``world_size / context_parallel`` x ``context_parallel``.

    Ranks that share a row (cp) are adjacent, so on a machine with several
    GPUs they are on the same node.
    """
    if context_parallel < 1 or world_size % context_parallel:
        raise ValueError(
            f"{world_size} processes cannot be split into groups of {context_parallel} context-parallel "
            "ranks: use a number of processes that is a multiple of it"
        )
    shape = (world_size // context_parallel, context_parallel)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def setup_runtime(
    device: str | None = "auto",
    precision: str = "auto",
    threads: int | None = None,
    distributed: bool = False,
    group_of_one: bool = False,
    context_parallel: int = 1,
) -> Runtime:
    """Pick the device, precision and CPU threads; with ``distributed``, join torchrun's process group.

    ``device``: "auto" (or None: CUDA when available, else the CPU), "cpu", "cuda" (under torchrun,
    this process's local GPU) or "cuda:N". ``precision``: "fp32"; "bf16" or "fp16" (autocast; fp16
    also scales the loss, see ``Runtime.grad_scaler``); "auto" means bf16 on a CUDA device that
    supports it (compute capability 8.0 and up) and fp32 otherwise: fp32 on a CPU, where bf16 and
    fp16 run but are emulated unless the CPU has them natively (``Runtime.precision_note``).
    ``threads`` (CPU only): None leaves torch's own choice, 0 shares the cores between the processes
    of this machine, N sets N. Distributed processes form a (world_size / context_parallel,
    context_parallel) mesh (``build_mesh``, ``Runtime.mesh``); ``group_of_one`` forms a process
    group and mesh even for a single process (FSDP needs one).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    if context_parallel > 1 and (world_size == 1 or world_size % context_parallel):
        raise ValueError(
            f"--context-parallel {context_parallel} splits each row across {context_parallel} processes, "
            f"but {world_size} process(es) run: launch a multiple of {context_parallel} with "
            f"torchrun --nproc_per_node {context_parallel}"
        )
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
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{dev} does not support bf16: use --precision fp16 or fp32")
    grouped = distributed and (world_size > 1 or group_of_one)
    owns = grouped and not dist.is_initialized()
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if world_size > 1:
            dist.init_process_group(backend)  # torchrun's rendezvous (MASTER_ADDR/PORT or c10d)
        else:  # a group of one needs no rendezvous: an in-process store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = build_mesh(dev.type, world_size, context_parallel) if grouped else None
    return Runtime(dev, LOW_PRECISION_DTYPES.get(precision), rank, world_size, owns, mesh)
