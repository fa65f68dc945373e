"""How a training run spreads over processes: one process, DDP, FSDP2, context parallelism; from outside.

``--parallel`` (``parallel_mode``):

- ``none``: one process, the plain loop.
- ``ddp``: every rank holds the whole model and optimizer; DDP averages the
  gradients over every rank. The default (``auto``) under torchrun: when the
  model and its optimizer fit on one device it is the fastest choice (one
  all-reduce per step, no gathers).
- ``fsdp``: FSDP2. ``shard_model`` calls ``fully_shard`` on each piece that
  holds weights (embeddings, latent_init, the cross-attend, each latent
  layer, the final norm with the logits layer) and then on the root, so each
  rank keeps 1/K of every weight, gradient and optimizer moment, and a
  layer's weights exist whole only while that layer runs. For models whose
  weights and Adam state (16 bytes per parameter in fp32) do not fit on one
  device, or to free that memory for longer contexts.

``--context-parallel K`` composes with both: the module training calls is
then ``ContextParallel`` (each row's inputs split across K ranks), wrapped
by DDP or made FSDP's root; FSDP then shards over every rank
(``Runtime.fsdp_mesh``). The model code knows nothing of any of this.

Under FSDP:

- Mixed precision comes from the runtime (``Runtime.fsdp_mixed_precision``):
  bf16 weights for compute, fp32 gradient reductions, fp32 shards. fp16 is
  refused: ``torch.amp.GradScaler`` decides to skip a step from the local
  gradients only, so ranks could disagree.
- Gradient accumulation: every micro-step reduce-scatters its gradients into
  the fp32 gradient shards, and weights are resharded after each backward.
  Skipping the reduce-scatter between micro-steps (``no_sync`` as DDP does)
  would keep a whole unsharded copy of the gradients on every rank, the
  memory FSDP exists to save; the sums are the same either way.
- Clipping: ``clip_grad_norm_`` sees DTensor gradient shards and computes the
  norm of the whole gradient over all ranks (``full_tensor``), so every rank
  clips by the same factor, as one process would.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5, which has no FSDP2 (parallel_mode refuses fsdp there)
    from torch.distributed._tensor import DTensor

from .context_parallel import ContextParallel
from .model import PerceiverAR
from .runtime import Runtime

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
PARALLEL_HELP = (
    "how the processes share the work: auto (none for one process, ddp under torchrun), none, ddp "
    "(every rank holds the whole model) or fsdp (FSDP2: weights, gradients and optimizer state "
    "sharded over the ranks; checkpoints sharded)"
)


def parallel_mode(requested: str, world_size: int, precision: str) -> str:
    """The mode a session runs: ``requested`` resolved for ``world_size`` processes, or a clear error."""
    if requested not in PARALLEL_MODES:
        raise ValueError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {requested!r}")
    if requested == "auto":
        return "ddp" if world_size > 1 else "none"
    if requested == "none" and world_size > 1:
        raise ValueError(
            f"--parallel none trains in one process, but torchrun started {world_size}: "
            "use --parallel ddp or fsdp"
        )
    if requested == "ddp" and world_size == 1:
        return "none"  # DDP over one process is the plain loop
    if requested == "fsdp":
        if precision == "fp16":
            raise ValueError(
                "--parallel fsdp does not support --precision fp16 (its gradient scaler is not "
                "shard-aware): use --precision bf16 or fp32, or --parallel ddp"
            )
        try:
            from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter  # noqa: F401
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            raise ValueError(
                f"--parallel fsdp needs torch >= 2.8 (FSDP2 and sharded safetensors checkpoints); "
                f"this is torch {torch.__version__}: upgrade torch or use --parallel ddp"
            ) from None
    return requested


def shard_model(model: PerceiverAR, rt: Runtime, root: nn.Module | None = None) -> None:
    """FSDP2 in place: every piece of the model that holds weights is its own unit, then the root.

    The units are the token and each position table, latent_init, the
    cross-attend, each latent layer, and the final norm with the logits layer.
    Each unit's weights are gathered just before it runs and freed after
    (``reshard_after_forward``), so a rank holds at most one layer whole.
    No weight is left to the root: a forward that calls the model's pieces
    rather than its ``forward`` (``ContextParallel``) gathers each piece as
    it calls it. ``root``: the module whose forward training calls, when it
    is not ``model`` (the context-parallel wrapper); it becomes FSDP's root.
    """
    from torch.distributed.fsdp import fully_shard

    mesh, policy = rt.fsdp_mesh, rt.fsdp_mixed_precision()
    units: list[nn.Module | list[nn.Module]] = [model.tok_embeddings, *model.pos_embeddings]
    units += [model.latent_init, model.cross_attend, *model.latent_layers, [model.norm, model.output]]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if root is not None and root is not model:
        fully_shard(root, mesh=mesh, mp_policy=policy)
    left = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    assert not left, f"weights outside every FSDP unit: {left}"


def parallelize(model: PerceiverAR, rt: Runtime, mode: str) -> nn.Module:
    """Apply ``mode`` to ``model`` (on its device); returns the module whose forward training calls.

    With context parallelism (``rt.cp_size`` > 1) that module first splits
    each row across the ranks of a group (``ContextParallel``). FSDP changes
    ``model`` in place (its parameters become DTensor shards); DDP returns a
    wrapper and leaves ``model`` as it is. Both reduce gradients over every
    rank: the K ranks of a row each hold part of its gradient.
    """
    forward: nn.Module = model if rt.cp_size == 1 else ContextParallel(model, rt.cp_group)
    if mode == "fsdp":
        shard_model(model, rt, forward)
        # The logits are a view of the logits layer's output (Linear on [B, M, D]); FSDP warns that an
        # in-place op on a view would bypass its backward hook. Nothing modifies them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        return forward
    if mode == "ddp":
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(forward, device_ids=ids)
    return forward


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages ``model``."""
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(forward_model: Any, sync: bool) -> Iterator[None]:
    """Around one micro-step: DDP skips its all-reduce unless ``sync`` (the last micro-step).

    FSDP reduce-scatters every micro-step (see the module docstring); one
    process has nothing to sync.
    """
    if not sync and isinstance(
        getattr(forward_model, "_orig_mod", forward_model), nn.parallel.DistributedDataParallel
    ):
        with forward_model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the gradient norm of the whole model to ``max_norm``; returns the norm before clipping.

    Under FSDP the gradients are DTensor shards: the norm is reduced over
    the ranks, so every rank sees (and clips by) the norm of the whole gradient.
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def local_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict as this rank holds them (a DTensor's local shard)."""
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items() if torch.is_tensor(v)}


def non_finite_weights(model: nn.Module, rt: Runtime) -> list[str]:
    """Names of weights holding a NaN or an inf on any rank; every rank gets the same answer to act on."""
    bad = [
        k
        for k, v in local_tensors(model.state_dict()).items()
        if v.is_floating_point() and not bool(v.isfinite().all())
    ]
    if is_sharded(model) and rt.any(bool(bad)) and not bad:
        return ["(a shard on another rank)"]
    return bad


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole weights of a sharded model on rank 0 (on the CPU), None on the other ranks.

    Every rank must call it (it gathers each weight in turn); rank 0 never
    holds more than the whole weights once, on the CPU.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state or None
