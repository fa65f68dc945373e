"""A run's checkpoints: written plain or sharded, read back at any world size, exported as a model.

    checkpoints/step_000123/     plain (one process, DDP): rank 0 writes
        config.json, model.safetensors, provenance.json     a model directory
        optimizer.safetensors, train_state.json, MANIFEST.json
    checkpoints/step_000123/     sharded (--parallel fsdp): every rank writes its shards
        config.json, provenance.json, train_state.json, MANIFEST.json
        shards/shard-0000R-model-00001-of-00001.safetensors      rank R-1's pieces

Sharded checkpoints go through ``torch.distributed.checkpoint`` (DCP) with its
safetensors storage (``HuggingFaceStorageWriter(save_distributed=True)``): each
rank writes the chunks it holds of every weight and optimizer moment, with
their offsets in the whole tensor in the safetensors header (JSON). Reading
(``HuggingFaceStorageReader``) rebuilds DCP's metadata from those headers and
DCP reshards: a checkpoint written by K ranks loads into any number of ranks,
sharded or not. DCP's default file format is not used because it pickles:
its ``.metadata`` file is written with ``pickle.dump`` and read with an
unrestricted ``pickle.load`` in torch 2.13, and each tensor is a
``torch.save`` record. Here no checkpoint file holds a pickle; the optimizer's
parameter groups and scalars go to train_state.json.

Both kinds are published as issue-10 checkpoints: a unique temporary folder
(its name chosen by rank 0 and sent to the others), every file fsynced, a
MANIFEST.json with the SHA-256 of every file including each shard, then a
rename; a resume verifies the checksums on rank 0 and every rank loads the
checkpoint rank 0 chose. ``model/`` stays a plain model directory: under FSDP
its weights are gathered on rank 0 at each checkpoint.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .checkpoint import (
    CONFIG_NAME,
    PROVENANCE_NAME,
    is_model_dir,
    manifest_problem,
    non_finite_tensors,
    save_model,
    write_manifest,
)
from .config import PerceiverARConfig
from .files import (
    check_output_path,
    is_empty_dir,
    publish_dir,
    read_json,
    remove_temp,
    temp_dir_beside,
    write_json,
)
from .model import PerceiverAR
from .parallel import gathered_state_dict, is_sharded, local_tensors
from .run_dir import (
    CHECKPOINTS,
    OPTIMIZER,
    SHARDS,
    TRAIN_STATE,
    latest_valid_checkpoint,
    list_checkpoints,
    publish_model,
)
from .runtime import Runtime


@dataclass
class TrainState:
    """Everything a resume needs.

    The crops of a step, its dropout masks and its learning rate are functions
    of (seed, step), and the seed is in the run's config: so the step, the
    weights and the optimizer moments are the whole state of a run (with
    fp16, also the gradient scaler's current scale).
    """

    model: PerceiverAR
    optimizer: torch.optim.Optimizer
    step: int = 0
    # Enabled for fp16 only (Runtime.grad_scaler); disabled it passes everything through.
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (ckpt / SHARDS).is_dir()


def split_state(state: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer's per-parameter state as tensors (for safetensors or DCP) and the rest (for JSON)."""
    tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for name, entries in state.items():
        for key, value in entries.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{name}.{key}"] = value
    return tensors, scalars


def join_state(*parts: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    """The inverse of ``split_state``: ``{"<parameter>.<key>": value}`` back to per-parameter dicts."""
    state: dict[Any, dict[str, Any]] = {}
    for part in parts:
        for name, value in part.items():
            param, _, key = name.rpartition(".")
            state.setdefault(param, {})[key] = value
    return state


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path, state: TrainState, notes: dict[str, Any], keep: int, rt: Runtime | None = None
) -> Path:
    """Write checkpoints/step_N and publish model/; every rank calls it. Keeps the last ``keep``.

    A sharded model (FSDP) writes a sharded checkpoint, every rank its
    shards; otherwise rank 0 alone writes a plain one. ``notes`` go into
    train_state.json for people reading it; a resume reads only the step, the
    optimizer and the gradient scaler from it.
    """
    rt = rt or Runtime(torch.device("cpu"), None)
    final = run_dir / CHECKPOINTS / f"step_{state.step:06d}"
    sharded = is_sharded(state.model)
    if not (sharded or rt.is_main):
        return final
    tmp = temp_dir_beside(final) if rt.is_main else None
    if sharded:  # every rank writes into the folder rank 0 made
        tmp = Path(rt.broadcast_text(str(tmp or "")))
    assert tmp is not None
    try:
        record = {**notes, "step": state.step}
        record.update(write_shards(tmp, state, rt) if sharded else write_plain(tmp, state))
        if state.scaler.is_enabled():
            record["grad_scaler"] = state.scaler.state_dict()  # floats and ints
        if rt.is_main:
            if sharded:  # the model's config and data, without its weights
                write_json(tmp / CONFIG_NAME, state.model.config.to_dict())
                if state.model.provenance is not None:
                    write_json(tmp / PROVENANCE_NAME, state.model.provenance)
            (tmp / TRAIN_STATE).write_text(json.dumps(record, indent=2) + "\n")
            write_manifest(tmp, step=state.step)
            publish_dir(tmp, final)  # an older step_N (a resumed run redoing it) is replaced
    except BaseException:
        if rt.is_main:
            remove_temp(tmp)
        raise
    publish_weights(state.model, run_dir, rt)
    if rt.is_main:
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    return final


def write_plain(tmp: Path, state: TrainState) -> dict[str, Any]:
    """The model directory and optimizer.safetensors of a plain checkpoint; returns the optimizer record."""
    save_model(state.model, state.model.config, tmp, state.model.provenance, manifest=False)
    # The optimizer's tensors (moments, step counts) go to safetensors, its
    # scalars and parameter groups to JSON.
    opt_state = state.optimizer.state_dict()
    tensors, scalars = split_state(opt_state["state"])
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    bad = non_finite_tensors(tensors)
    if bad:
        raise ValueError(f"the optimizer state is not finite (NaN or inf in {', '.join(bad[:3])}): not saved")
    save_file(tensors, str(tmp / OPTIMIZER))
    return {"optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars}}


def sharded_state_dicts(state: TrainState) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and the optimizer's state dicts keyed by parameter name, as this rank holds them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(state.model, state.optimizer)


def write_shards(tmp: Path, state: TrainState, rt: Runtime) -> dict[str, Any]:
    """Every rank writes its chunks of the weights and optimizer tensors to tmp/shards (DCP, safetensors).

    Returns the optimizer's parameter groups and scalars, for train_state.json.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    model_state, opt_state = sharded_state_dicts(state)
    tensors, scalars = split_state(opt_state["state"])
    local = {**local_tensors(model_state), **local_tensors(tensors)}
    bad = non_finite_tensors(local)
    if rt.any(bool(bad)):
        raise ValueError(
            f"the weights or optimizer state are not finite ({', '.join(bad[:3]) or 'another rank'})"
        )
    writer = HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True)
    dcp.save({"model": model_state, "optim": tensors}, storage_writer=writer)
    return {"optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars}}


def publish_weights(model: PerceiverAR, run_dir: Path, rt: Runtime) -> None:
    """Rank 0 replaces model/ with the current weights, gathered from the shards under FSDP."""
    weights = gathered_state_dict(model) if is_sharded(model) else None
    if rt.is_main:
        publish_model(model, run_dir, weights)


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def find_checkpoint(run_dir: Path, rt: Runtime) -> tuple[Path, list[str]]:
    """The newest checkpoint whose checksums pass (verified on rank 0), the same on every rank.

    Returns it with a note for each newer one skipped (rank 0's).
    """
    notes: list[str] = []
    chosen = ""
    if rt.is_main:
        try:
            ckpt, notes = latest_valid_checkpoint(run_dir)
            chosen = str(ckpt)
        finally:  # the other ranks wait for the answer, even when rank 0 has none
            rt.broadcast_text(chosen)
    else:
        chosen = rt.broadcast_text("")
        if not chosen:
            raise FileNotFoundError(f"rank 0 found no valid checkpoint in {run_dir}")
    return Path(chosen), notes


def model_from_checkpoint(ckpt: Path) -> PerceiverAR:
    """The model a checkpoint describes: with its weights (plain) or to be filled by ``load_checkpoint``."""
    if not is_sharded_checkpoint(ckpt):
        return PerceiverAR.from_pretrained(ckpt, verify=False)  # its checksums were verified already
    try:
        model = PerceiverAR(PerceiverARConfig.load(ckpt / CONFIG_NAME))
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot read the model config of {ckpt}: {e}") from None
    model.provenance = read_json(ckpt / PROVENANCE_NAME) if (ckpt / PROVENANCE_NAME).is_file() else None
    return model


def load_checkpoint(ckpt: Path, state: TrainState) -> int:
    """Restore the weights and optimizer of ``state`` (sharded or not) from ``ckpt``; returns its step.

    Every layout loads into every kind of model: a sharded checkpoint is
    resharded by DCP to this model's ranks (or whole, for a plain model); a
    plain one was loaded whole into the model before it was sharded, and its
    optimizer state is sharded here. A gradient scaler saved by an fp16 run
    is restored only into an fp16 run; any other run starts its scaler afresh.
    """
    record = json.loads((ckpt / TRAIN_STATE).read_text())
    if state.scaler.is_enabled() and "grad_scaler" in record:
        state.scaler.load_state_dict(record["grad_scaler"])
    groups, scalars = record["optimizer"]["param_groups"], record["optimizer"]["scalars"]
    if is_sharded_checkpoint(ckpt):
        read_shards(ckpt, state, groups, scalars)
    elif is_sharded(state.model):
        load_plain_optimizer_sharded(ckpt, state, groups, scalars)
    else:
        per_param = join_state(load_file(str(ckpt / OPTIMIZER)), scalars)
        state.optimizer.load_state_dict(
            {"state": {int(k): v for k, v in per_param.items()}, "param_groups": groups}
        )
    return int(record["step"])


def read_shards(ckpt: Path, state: TrainState, groups: list[dict[str, Any]], scalars: dict[str, Any]) -> None:
    """Fill ``state`` from a sharded checkpoint: DCP reads the chunks this rank needs, whatever wrote them."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, opt_state = sharded_state_dicts(state)  # the shapes and placements to fill
    tensors, _ = split_state(opt_state["state"])
    target = {"model": model_state, "optim": tensors}
    load_shards(target, ckpt, single_process=not dist.is_initialized())
    optim = {"state": join_state(target["optim"], scalars), "param_groups": groups}
    set_state_dict(state.model, state.optimizer, model_state_dict=target["model"], optim_state_dict=optim)


def load_shards(target: dict[str, Any], ckpt: Path, single_process: bool) -> None:
    """DCP fills the tensors of ``target`` from the shards of ``ckpt`` (all ranks together, or this one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(ckpt / SHARDS))
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=reader, no_dist=single_process)


def load_plain_optimizer_sharded(
    ckpt: Path, state: TrainState, groups: list[dict[str, Any]], scalars: dict[str, Any]
) -> None:
    """A plain checkpoint's optimizer state (numbered by parameter) into an FSDP optimizer.

    The optimizer numbers its parameters in the order of its groups, the same
    order the run's optimizer had when it saved them; named, the whole
    moments are handed to ``set_optimizer_state_dict``, which keeps this rank's shard.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in state.model.named_parameters()}
    order = [names[id(p)] for group in state.optimizer.param_groups for p in group["params"]]
    per_param = join_state(load_file(str(ckpt / OPTIMIZER)), scalars)
    named = {
        "state": {order[int(pid)]: value for pid, value in per_param.items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in groups],
    }
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(state.model, state.optimizer, named, options=options)


# ----------------------------------------------------------------------------
# Export: a checkpoint as a model directory
# ----------------------------------------------------------------------------


def export_model(
    source: str | Path, out_dir: str | Path, overwrite: bool = False
) -> tuple[Path, PerceiverAR]:
    """Write the model of a checkpoint as a model directory (config.json, model.safetensors, provenance).

    ``source``: a run directory (its newest checkpoint whose checksums pass)
    or one checkpoint folder (checked against its manifest). A sharded
    checkpoint is consolidated in this one process, whatever number of ranks
    wrote it. ``out_dir`` must be new or empty, or (with ``overwrite``) a
    model directory; it is written aside and renamed into place. Returns the
    checkpoint used and the model.
    """
    source = Path(source)
    if (source / TRAIN_STATE).is_file():
        problem = manifest_problem(source)
        if problem:
            raise ValueError(f"{source} is corrupt or incomplete ({problem}): export another checkpoint")
        ckpt = source
    elif (source / CHECKPOINTS).is_dir():
        ckpt = latest_valid_checkpoint(source)[0]
    else:
        raise FileNotFoundError(f"{source} is neither a training run nor one of its checkpoints")
    out = check_output_path(out_dir, [source], flag="OUT_DIR", scanned=False)
    if out.exists() and not is_empty_dir(out):
        if not is_model_dir(out):
            raise ValueError(f"OUT_DIR {out_dir} is not empty and is not a model directory: choose another")
        if not overwrite:
            raise ValueError(f"OUT_DIR {out_dir} already holds a model: pass --overwrite to replace it")
    model = model_from_checkpoint(ckpt)
    if is_sharded_checkpoint(ckpt):
        load_shards({"model": model.state_dict()}, ckpt, single_process=True)  # filled in place
    tmp = temp_dir_beside(out)
    try:
        model.save_pretrained(tmp)
        publish_dir(tmp, out)
    except BaseException:
        remove_temp(tmp)
        raise
    return ckpt, model
