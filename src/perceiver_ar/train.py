"""Training: ``TrainConfig`` (the run config) and ``train(cfg)``, one loop read top to bottom.

The run directory (config, metrics, checkpoints, the published model) is
written by ``run_dir``, the loss curve drawn by ``plots``, and the device,
precision and process group come from ``runtime``.

Resuming is exact because everything random is a function of (seed, step):
the crops of step s come from ``sampler.crops(s)`` and every step reseeds
torch (dropout) from (seed, step, rank). So the state to save is the step,
the weights and the optimizer moments (``run_dir.TrainState``).

Under ``torchrun`` each rank takes its own slice of the global batch and the
loss is normalised by the global number of target tokens, so 2 processes
compute the gradients of 1 process with the doubled batch. With
``--context-parallel K`` each group of K ranks shares its rows, each rank
holding a slice of every row's inputs (``context_parallel.py``).

Safety (README "Safety"): the run directory is claimed and locked before
anything is written (``run_dir.claim_run_dir``); a resume keeps the stored
config except the settings safe to change, and starts from the newest
checkpoint whose checksums pass; a non-finite loss, gradient norm or weight
stops the run with ``DivergenceError`` before anything non-finite is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checks, provenance
from .checkpoint import non_finite_tensors
from .config import PRESETS, PerceiverARConfig
from .context_parallel import ContextParallel
from .evaluate import evaluate, unigram_log2p
from .loss import perceiver_ar_loss, shift_events
from .model import PerceiverAR
from .plots import plot_losses
from .run_dir import (
    LOSS_PLOT,
    METRICS,
    MODEL,
    RunLog,
    TrainState,
    check_same_store,
    claim_run_dir,
    is_run_dir,
    latest_valid_checkpoint,
    list_checkpoints,
    load_optimizer_state,
    publish_model,
    read_train_config,
    resume_changes,
    save_checkpoint,
    write_run_marker,
    write_train_config,
)
from .runtime import PRECISIONS, Runtime, setup_runtime
from .samplers import (
    RandomCrops,
    StreamWindows,
    check_batch,
    crops_to_batch,
    make_sampler,
    max_position,
    targets_per_row,
)
from .store import TokenStore


def option(default: Any, text: str, check: checks.Check) -> Any:
    """A TrainConfig field, its help text and its value check, shared with its ``perceiver-ar train`` flag."""
    return field(default=default, metadata={"help": text, "check": check})


class DivergenceError(RuntimeError):
    """A non-finite loss, gradient norm or weight: the run stopped and nothing non-finite was saved."""


@dataclass
class TrainConfig:
    """How to train: data, model preset and overrides, optimisation, logging."""

    data: str = option("", "the data store to train on, written by `perceiver-ar prepare`", checks.string)
    out: str = option(
        "runs/run", "the run directory: checkpoints/, metrics.jsonl, loss.png, model/", checks.text
    )
    preset: str = option("demo", f"model preset: {', '.join(PRESETS)}", checks.choice(*PRESETS))
    model: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "overrides of the preset's model config fields"},
    )
    init_from: str | None = option(
        None, "start from the weights and config of this model or run directory", checks.optional(checks.text)
    )
    resume: bool = option(False, "continue the run from its last complete checkpoint", checks.boolean)
    steps: int = option(
        1000,
        "optimizer steps in all, the schedule's length (a resumed run goes on to it; it can only grow)",
        checks.positive_int,
    )
    stop_at: int = option(
        0,
        "end this session at this step with a checkpoint, as if interrupted, to resume later (0: off)",
        checks.nonnegative_int,
    )
    batch_size: int = option(
        16, "rows per optimizer step, over all processes and accumulation micro-steps", checks.positive_int
    )
    grad_accum: int = option(
        1, "gradient accumulation micro-steps per optimizer step (each process)", checks.positive_int
    )
    sampler: str = option(
        "crops",
        "crops: random crops ending anywhere in the split (documents weigh by length); "
        "document-crops: each document equally likely, then a random crop (the official weighting); "
        "stream: fixed windows over all documents",
        checks.choice("crops", "document-crops", "stream"),
    )
    optimizer: str = option("adamw", "adamw, adam or sgd", checks.choice("adamw", "adam", "sgd"))
    lr: float = option(1e-3, "peak learning rate", checks.positive_float)
    min_lr_ratio: float = option(0.1, "the cosine schedule ends at lr x this", checks.unit_interval)
    schedule: str = option(
        "cosine", "cosine or constant after the warm-up", checks.choice("cosine", "constant")
    )
    warmup_steps: int = option(100, "steps of linear warm-up from 0", checks.nonnegative_int)
    weight_decay: float = option(
        0.0, "decoupled weight decay (adamw) on matrices only", checks.nonnegative_float
    )
    beta1: float = option(0.9, "Adam beta1", checks.fraction)
    beta2: float = option(0.95, "Adam beta2", checks.fraction)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)", checks.nonnegative_float)
    seed: int = option(0, "seed of the initial weights, the crops and dropout", checks.nonnegative_int)
    eval_every: int = option(
        500, "steps between validation evaluations (0: only at the end)", checks.nonnegative_int
    )
    eval_tokens: int = option(
        32768, "validation targets scored at each evaluation (block protocol)", checks.positive_int
    )
    eval_batch_size: int = option(8, "rows per evaluation forward", checks.positive_int)
    checkpoint_every: int = option(
        500, "steps between checkpoints (the last step always saves)", checks.nonnegative_int
    )
    keep_checkpoints: int = option(
        3, "how many of the latest checkpoints to keep (0: all)", checks.nonnegative_int
    )
    log_every: int = option(10, "steps between progress-bar and TensorBoard updates", checks.positive_int)
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N", checks.text)
    precision: str = option(
        "auto",
        "auto (bf16 autocast on a CUDA GPU that has bf16, else fp32), fp32, bf16 (autocast, fp32 master "
        "weights) or fp16 (autocast with a gradient scaler)",
        checks.choice(*PRECISIONS),
    )
    threads: int = option(0, "CPU threads per process (0: cores / local processes)", checks.nonnegative_int)
    context_parallel: int = option(
        1,
        "split each row's inputs across this many processes (context parallelism; under torchrun, "
        "processes = data-parallel groups x this)",
        checks.positive_int,
    )
    compile: bool = option(
        False,
        "torch.compile the training forward (compiled once for full batches, once for short crops)",
        checks.boolean,
    )
    progress: bool = option(True, "show a progress bar", checks.boolean)
    tensorboard: bool = option(True, "also log to TensorBoard when it is installed", checks.boolean)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                try:
                    setattr(self, f.name, check(getattr(self, f.name)))
                except ValueError as e:
                    raise ValueError(f"TrainConfig.{f.name} (--{f.name.replace('_', '-')}) {e}") from None
        if not isinstance(self.model, dict):
            raise ValueError(f"TrainConfig.model must be a dict of model config fields, got {self.model!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**d)


def resume_config(run_dir: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """The saved config of ``run_dir`` with ``resume=True`` and ``overrides`` applied."""
    d = read_train_config(run_dir)
    d["stop_at"] = 0  # a session setting: the resumed session runs on unless told otherwise
    d.update(overrides, out=str(run_dir), resume=True)
    return TrainConfig.from_dict(d)


# ----------------------------------------------------------------------------
# Seeds, learning rate, optimizer
# ----------------------------------------------------------------------------


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank (dropout masks)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine down to ``lr * min_lr_ratio`` (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(cfg: TrainConfig, model: PerceiverAR) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``, weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay on matrices (Linear weights, embeddings) only, never on biases or LayerNorms.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)
    if cfg.optimizer == "adam":
        if cfg.weight_decay:
            raise ValueError("Adam adds weight decay to the gradient: use --optimizer adamw for weight decay")
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: choose 'adamw', 'adam' or 'sgd'")


# ----------------------------------------------------------------------------
# The model for a run
# ----------------------------------------------------------------------------


def build_model_config(cfg: TrainConfig, store: TokenStore) -> PerceiverARConfig:
    """The preset with overrides, sized to the data: vocabulary and absolute position tables."""
    overrides = dict(cfg.model)
    overrides.setdefault("vocab_size", store.vocab_size)
    model_cfg = PerceiverARConfig.from_preset(cfg.preset, **overrides)
    if model_cfg.position_encoding == "absolute" and "position_table_sizes" not in cfg.model:
        needed = required_table_sizes(model_cfg, cfg.sampler, store)
        model_cfg = PerceiverARConfig.from_preset(cfg.preset, **overrides, position_table_sizes=needed)
    return model_cfg


def required_table_sizes(model_cfg: PerceiverARConfig, sampler: str, store: TokenStore) -> tuple[int, ...]:
    """Rows each absolute position table needs for this data (max position + 1)."""
    if sampler == "stream":
        return (model_cfg.context_len + 1,)
    longest = max(int(store.split(s).lengths.max(initial=1)) for s in store.split_names)
    return tuple(int(p) + 1 for p in max_position(store.meta, longest))


def check_model_fits_data(model_cfg: PerceiverARConfig, sampler: str, store: TokenStore) -> None:
    """Refuse a model whose vocabulary or absolute position tables cannot hold the data."""
    if store.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"the data has vocab_size {store.vocab_size} but the model only {model_cfg.vocab_size}: "
            "train a new model (without --init-from) or prepare the data with the model's tokenizer"
        )
    if model_cfg.position_encoding == "absolute":
        needed = required_table_sizes(model_cfg, sampler, store)
        have = model_cfg.position_table_sizes
        if len(needed) != len(have) or any(h < n for h, n in zip(have, needed, strict=False)):
            raise ValueError(
                f"the absolute position tables hold {list(have)} rows but the documents need {list(needed)}: "
                f"set --model.position_table_sizes '{list(needed)}', use --sampler stream, "
                "or use rotary positions"
            )


def initial_state(cfg: TrainConfig, store: TokenStore, rt: Runtime) -> tuple[TrainState, list[str]]:
    """Where a run starts: its newest valid checkpoint (resume), a model directory (init_from) or the preset.

    Returns the state and notes for the run's log (checkpoints skipped as
    corrupt, a model without provenance). The model must have been trained
    on data like the store's (``provenance.check_store``). It stays fp32
    whatever the precision: autocast computes in bf16 or fp16 from these
    master weights, and the optimizer state is fp32 too.
    """
    run_dir = Path(cfg.out)
    ckpt, notes = None, []
    if cfg.resume:
        ckpt, notes = latest_valid_checkpoint(run_dir)
        model = PerceiverAR.from_pretrained(ckpt, verify=False)  # its checksums were just verified
    elif list_checkpoints(run_dir):
        raise ValueError(
            f"{run_dir} already holds checkpoints: pass --resume {run_dir} or choose another --out"
        )
    elif cfg.init_from:
        model = PerceiverAR.from_pretrained(cfg.init_from)
    else:
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        model = PerceiverAR(build_model_config(cfg, store))
        model.provenance = provenance.from_store_meta(store.meta)
    source = str(ckpt or cfg.init_from or "")
    note = provenance.check_store(model.provenance, model.config.vocab_size, store.meta, cfg.data, source)
    notes += [note] if note else []
    model.provenance = provenance.from_store_meta(store.meta)  # what it is trained on from now
    check_model_fits_data(model.config, cfg.sampler, store)
    model.to(rt.device)
    state = TrainState(model, make_optimizer(cfg, model), scaler=rt.grad_scaler())
    if ckpt is not None:
        state.step = load_optimizer_state(state.optimizer, ckpt, state.scaler)
    return state, notes


# ----------------------------------------------------------------------------
# One step, one evaluation, one checkpoint
# ----------------------------------------------------------------------------


def compile_forward(module: torch.nn.Module) -> Any:
    """``torch.compile`` of the training forward (``--compile``), for static shapes.

    Every micro-batch of a run has the same shape [B, N], so the graph is
    compiled for exact sizes (no dynamic-shape kernels). Its guards see one
    Python value that changes between steps, ``full_rows``: a run compiles
    at most two graphs (batches of full crops, and batches holding short
    crops), each once, and never recompiles after. The forward is free of
    host syncs and graph breaks (tests/test_compile.py).
    """
    return torch.compile(module, dynamic=False)


def train_step(
    cfg: TrainConfig,
    rt: Runtime,
    state: TrainState,
    forward_model: Any,
    sampler: RandomCrops | StreamWindows,
    store: TokenStore,
) -> dict[str, Any]:
    """One optimizer step (this rank's micro-steps, gradient sync, clip, update); returns its metrics."""
    t_step = time.perf_counter()
    model_cfg = state.model.config
    micro_batch = cfg.batch_size // (rt.dp_size * cfg.grad_accum)
    lr = lr_at(cfg, state.step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    # The global batch of this step is the same on every rank; each data-parallel
    # group takes its slice. Dividing by the global target count makes the DDP
    # average of the ranks' gradients the gradient of the per-token mean loss:
    # the K ranks of a context-parallel group compute the same loss, and the
    # group's gradient sum is K times its rows' (context_parallel.py).
    crops = sampler.crops(state.step, cfg.batch_size)
    global_targets = int(targets_per_row(crops, model_cfg.num_latents).sum())
    local = crops[rt.dp_rank * cfg.batch_size // rt.dp_size :][: cfg.batch_size // rt.dp_size]
    torch.manual_seed(step_seed(cfg.seed, state.step, rt.dp_rank))  # same dropout in a cp group
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss, CE, input tokens
    for micro in range(cfg.grad_accum):
        events, positions = crops_to_batch(
            store.split("train"),
            store.meta,
            local[micro * micro_batch : (micro + 1) * micro_batch],
            model_cfg.context_len,
        )
        # Checked here on the host, so the forward neither reads values nor
        # waits for the device: a row is full when its crop holds N + 1 events.
        full_rows = check_batch(events, positions, model_cfg)
        inputs, targets = shift_events(torch.from_numpy(events).to(rt.device))
        positions = torch.from_numpy(positions).to(rt.device)
        # Only the last micro-step syncs gradients across ranks.
        sync = micro == cfg.grad_accum - 1 or rt.world_size == 1
        with contextlib.nullcontext() if sync else forward_model.no_sync(), rt.autocast():
            out = forward_model(inputs, positions, full_rows=full_rows, validate=False)
            loss = perceiver_ar_loss(out.logits, targets, out.latent_index, model_cfg.z_loss)
        # fp16: the scaler multiplies the loss so that small gradients survive (a no-op otherwise).
        state.scaler.scale(loss.total * (rt.dp_size / global_targets)).backward()
        sums += torch.stack(
            [loss.total.detach().double(), loss.total_ce.detach().double(), (inputs != 0).sum().double()]
        )
    if rt.world_size > 1:
        dist.all_reduce(sums)  # a sync point: every rank waits for the slowest
        sums /= rt.cp_size  # the ranks of a context-parallel group counted the same rows
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    state.scaler.unscale_(state.optimizer)  # clip the true gradients
    grad_norm = float(torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip))
    loss_sum = float(sums[0])
    # Divergence stops the run before the update touches the weights. With fp16
    # the gradient scaler skips a step whose gradients overflowed (and lowers
    # its scale): that is its normal working, so only the loss counts then.
    grads_ok = math.isfinite(grad_norm) or state.scaler.is_enabled()
    if not (math.isfinite(loss_sum) and grads_ok):
        state.optimizer.zero_grad(set_to_none=True)
        raise DivergenceError(
            f"step {state.step + 1}: the loss is {loss_sum / global_targets:g} and the gradient norm "
            f"{grad_norm:g}: training diverged"
        )
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    seconds = time.perf_counter() - t_step
    return {
        "step": state.step,
        "loss": loss_sum / global_targets,
        "bits_per_token": float(sums[1]) / global_targets / math.log(2),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": float(sums[2]) / seconds,
        "targets": global_targets,
        "seconds": seconds,
    }


def validate(
    cfg: TrainConfig, rt: Runtime, model: PerceiverAR, store: TokenStore, baseline: np.ndarray | None
) -> dict[str, Any] | None:
    """Block-protocol bits/token on the validation split (rank 0 only; None without one)."""
    if "validation" not in store.split_names or not rt.is_main:
        return None
    return evaluate(
        model,
        store.split("validation"),
        protocol="block",
        meta=store.meta,
        batch_size=cfg.eval_batch_size,
        max_tokens=cfg.eval_tokens,
        device=rt.device,
        autocast_dtype=rt.autocast_dtype,
        baseline_log2p=baseline,
    )


def checkpoint(cfg: TrainConfig, rt: Runtime, state: TrainState) -> int:
    """Rank 0 saves a checkpoint and publishes it as model/; returns the step saved.

    Non-finite weights are never written: every rank checks them first.
    """
    bad = non_finite_tensors(state.model.state_dict())
    if bad:
        raise DivergenceError(
            f"step {state.step}: the weights are not finite (NaN or inf in {', '.join(bad[:3])})"
        )
    if rt.is_main:
        notes = {
            "seed": cfg.seed,
            # Crops, dropout and the learning rate are functions of (seed, step):
            # restoring the step restores them.
            "sampler": {"kind": cfg.sampler, "next_step": state.step},
            "rng": {"torch_seed": "SeedSequence([seed, step, rank]) at every step"},
            "schedule": {"kind": cfg.schedule, "next_lr": lr_at(cfg, state.step)},
        }
        save_checkpoint(Path(cfg.out), state, notes, cfg.keep_checkpoints)
        publish_model(state.model, Path(cfg.out))
    return state.step


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a run; returns the final metrics, last eval and the run's paths.

    Rank 0 claims and locks the run directory first (``run_dir.claim_run_dir``)
    and holds the lock until the run ends, however it ends; a run that fails
    before writing anything removes the marker and folder its claim made.
    """
    if cfg.compile and cfg.context_parallel > 1:
        raise ValueError("--compile does not apply to --context-parallel: train one of them")
    rt = setup_runtime(cfg.device, cfg.precision, cfg.threads, True, cfg.context_parallel)
    store = TokenStore(cfg.data)
    if cfg.batch_size % (rt.dp_size * cfg.grad_accum):
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by data-parallel groups x grad_accum "
            f"= {rt.dp_size} x {cfg.grad_accum}"
        )
    inputs = [cfg.data, *([cfg.init_from] if cfg.init_from else [])]
    if not cfg.resume and not cfg.init_from:
        build_model_config(cfg, store)  # a bad model setting fails before the run directory is made
    lock = claim_run_dir(Path(cfg.out), cfg.resume, cfg.data, inputs) if rt.is_main else None
    finished = False
    try:
        result = run_session(cfg, rt, store)
        finished = True
        return result
    finally:
        if lock is not None:  # a run that failed before writing anything leaves no trace
            lock.release(abandon=not finished)


def diverged_message(what: str, saved_at: int) -> str:
    """What a diverged run left behind and what to do about it."""
    kept = (
        f"the checkpoint of step {saved_at} and model/ are as they were"
        if saved_at > 0
        else "nothing was saved"
    )
    return (
        f"{what}; {kept}. Start a new run with a lower --lr or with --grad-clip > 0 "
        "(--init-from RUN/model starts it from the last good weights)"
    )


def run_session(cfg: TrainConfig, rt: Runtime, store: TokenStore) -> dict[str, Any]:
    """The body of ``train`` once the run directory is claimed: start, the loop, the end."""
    run_dir = Path(cfg.out)
    changes: list[str] = []
    if cfg.resume:  # the stored config is authoritative; check before loading anything
        saved = TrainConfig.from_dict(read_train_config(run_dir)).to_dict()
        changes = resume_changes(saved, cfg.to_dict())
        check_same_store(run_dir, cfg.data)

    # --- the model and optimizer: from the last checkpoint, a model directory, or a preset
    state, notes = initial_state(cfg, store, rt)
    model, model_cfg = state.model, state.model.config
    result = {"run_dir": str(run_dir), "model_dir": str(run_dir / MODEL), "rank": rt.rank, "eval": None}
    if cfg.resume and state.step >= cfg.steps:  # a finished run: say so, change nothing
        rt.close()
        return {**result, "step": state.step, "finished_before": True, "seconds": 0.0, "loss": None}
    sampler = make_sampler(
        cfg.sampler, store.split("train"), model_cfg.context_len, model_cfg.num_latents, cfg.seed
    )
    # The module that runs the forward: context parallelism splits each row's
    # inputs across its group; DDP sums gradients over every rank.
    forward_model: Any = model if rt.cp_size == 1 else ContextParallel(model, rt.cp_group)
    if rt.world_size > 1:
        ddp_ids = [rt.device.index] if rt.device.type == "cuda" else None
        forward_model = torch.nn.parallel.DistributedDataParallel(forward_model, device_ids=ddp_ids)
    if cfg.compile:
        forward_model = compile_forward(forward_model)

    # --- logging: rank 0 alone writes the run directory and prints
    if rt.is_main:
        if not cfg.resume or not is_run_dir(run_dir):  # a new run, or one from before run.json
            write_run_marker(run_dir, cfg.data)
        write_train_config(run_dir, cfg.to_dict())
    log = RunLog(run_dir, state.step, cfg.steps, rt.is_main, cfg.progress, cfg.tensorboard)
    for note in notes:
        log.note(state.step, note)
    if cfg.resume:
        log.note(
            state.step,
            f"resumed at step {state.step}" + (f"; changed {', '.join(changes)}" if changes else ""),
        )
    else:
        log.note(0, f"started on {rt.world_size} process(es), {rt.device}", show=False)
    if state.step == 0:
        log.print(
            f"model: {model.num_parameters():,} parameters, N={model_cfg.context_len} "
            f"M={model_cfg.num_latents} E={model_cfg.input_dim} D={model_cfg.latent_dim} "
            f"L={model_cfg.num_latent_layers}; {rt.world_size} process(es) on {rt.device}, {rt.precision}"
            + (f", each row split across {rt.cp_size}" if rt.cp_size > 1 else "")
        )
    note = rt.precision_note()
    if note:
        log.print(note)
    baseline = unigram_log2p(store.split("train"), store.vocab_size) if rt.is_main else None

    # --- train
    model.train()
    last_eval = None
    last: dict[str, Any] = {}
    saved_at = state.step if cfg.resume else -1
    t0 = time.perf_counter()
    end_step = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
    try:
        while state.step < end_step:
            last = train_step(cfg, rt, state, forward_model, sampler, store)
            step = state.step
            log.step(last, show=step % cfg.log_every == 0 or step == cfg.steps)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < end_step:
                last_eval = log.eval(step, validate(cfg, rt, model, store, baseline))
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < end_step:
                saved_at = checkpoint(cfg, rt, state)

        # --- the end: a final evaluation, checkpoint and loss plot
        log.close_bar()
        if state.step == cfg.steps:  # not when stopped early: the run goes on later
            last_eval = log.eval(state.step, validate(cfg, rt, model, store, baseline)) or last_eval
        if saved_at != state.step:
            checkpoint(cfg, rt, state)
    except DivergenceError as e:
        log.close_bar()
        message = diverged_message(str(e), saved_at)
        log.note(state.step, message)
        log.close()
        raise DivergenceError(message) from None
    train_seconds = time.perf_counter() - t0
    if rt.is_main:
        plot_losses(run_dir / METRICS, run_dir / LOSS_PLOT)
    log.note(state.step, f"stopped at step {state.step} of {cfg.steps}", show=False)
    log.close()
    rt.close()  # waits until rank 0 has written the last checkpoint
    return {
        **result,
        "step": state.step,
        "loss": last.get("loss"),
        "bits_per_token": last.get("bits_per_token"),
        "eval": last_eval,
        "seconds": train_seconds,
        "finished_before": False,
    }
