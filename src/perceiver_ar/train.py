"""Training: ``train(cfg)``, one loop read top to bottom (the config is ``train_config.TrainConfig``).

The run directory (config, metrics, the published model) is written by
``run_dir``, checkpoints by ``run_checkpoints``, the loss curve drawn by
``plots``; the device, precision and process mesh come from ``runtime``, and
``parallel`` spreads the model over the processes (none, DDP or FSDP2).

Resuming is exact because everything random is a function of (seed, step):
the crops of step s come from ``sampler.crops(s)`` and every step reseeds
torch (dropout) from (seed, step, data-parallel rank). So the state to save
is the step, the weights and the optimizer moments (``run_checkpoints.TrainState``).

Under ``torchrun`` each data-parallel rank takes its own slice of the global
batch and the loss is normalised by the global number of target tokens, so 2
processes compute the gradients of 1 process with the doubled batch, with
DDP or FSDP alike. With ``--context-parallel K`` each group of K ranks
shares its rows, each rank holding a slice of every row's inputs
(``context_parallel.py``).

Safety (README "Safety"): the run directory is claimed and locked before
anything is written (``run_dir.claim_run_dir``); a resume keeps the stored
config except the settings safe to change, and starts from the newest
checkpoint whose checksums pass; a non-finite loss, gradient norm or weight
stops the run with ``DivergenceError`` before anything non-finite is saved.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import provenance
from .evaluate import evaluate, unigram_log2p
from .loss import perceiver_ar_loss, shift_events
from .model import PerceiverAR
from .parallel import (
    clip_grad_norm,
    gradient_sync,
    is_sharded,
    non_finite_weights,
    parallel_mode,
    parallelize,
)
from .plots import plot_losses
from .run_checkpoints import (
    TrainState,
    find_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from .run_dir import (
    LOSS_PLOT,
    METRICS,
    MODEL,
    RunLog,
    check_same_store,
    claim_run_dir,
    is_run_dir,
    list_checkpoints,
    read_train_config,
    resume_changes,
    write_run_marker,
    write_train_config,
)
from .runtime import Runtime, setup_runtime
from .samplers import RandomCrops, StreamWindows, check_batch, crops_to_batch, make_sampler, targets_per_row
from .store import TokenStore
from .train_config import TrainConfig, build_model_config, check_model_fits_data

__all__ = ["DivergenceError", "TrainConfig", "lr_at", "make_optimizer", "resume_config", "train"]


class DivergenceError(RuntimeError):
    """A non-finite loss, gradient norm or weight: the run stopped and nothing non-finite was saved."""


def resume_config(run_dir: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """The saved config of ``run_dir`` with ``resume=True`` and ``overrides`` applied."""
    d = read_train_config(run_dir)
    d["stop_at"] = 0  # a session setting: the resumed session runs on unless told otherwise
    d["overwrite"] = False  # how the run began, not how it goes on
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
    # The fused kernels update every parameter in one pass: on a CPU, where the
    # default loops over the parameters in Python, that is 8x less time for a
    # small model's ~60 tensors. Same algorithm, same state_dict.
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in params) else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, **fused)
    if cfg.optimizer == "adam":
        if cfg.weight_decay:
            raise ValueError("Adam adds weight decay to the gradient: use --optimizer adamw for weight decay")
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: choose 'adamw', 'adam' or 'sgd'")


def initial_state(
    cfg: TrainConfig, store: TokenStore, rt: Runtime, mode: str
) -> tuple[TrainState, Any, list[str]]:
    """Where a run starts: its newest valid checkpoint (resume), a model directory (init_from) or the preset.

    Returns the state, the module whose forward trains (the model spread
    over the processes by ``parallel.parallelize``, compiled with
    ``--compile``) and notes for the run's log (checkpoints skipped as
    corrupt, a model without provenance). The model must have been trained
    on data like the store's (``provenance.check_store``). It stays fp32
    whatever the precision: autocast (and FSDP's gathers) compute in bf16 or
    fp16 from these master weights, and the optimizer state is fp32 too. The
    optimizer is made after sharding, so it holds this rank's shards only.
    """
    run_dir = Path(cfg.out)
    ckpt, notes = None, []
    if cfg.resume:
        ckpt, notes = find_checkpoint(run_dir, rt)
        model = model_from_checkpoint(ckpt)
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
    forward_model = parallelize(model.to(rt.device), rt, mode)
    state = TrainState(model, make_optimizer(cfg, model), scaler=rt.grad_scaler())
    if ckpt is not None:
        state.step = load_checkpoint(ckpt, state)
    if cfg.compile:
        forward_model = compile_forward(forward_model)
    return state, forward_model, notes


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
    # group takes its slice. Dividing by the global target count makes the DDP or
    # FSDP average of the ranks' gradients the gradient of the per-token mean loss:
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
        # DDP syncs gradients across ranks at the last micro-step only (parallel.gradient_sync).
        with gradient_sync(forward_model, micro == cfg.grad_accum - 1), rt.autocast():
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
    grad_norm = clip_grad_norm(state.model, clip)  # of the whole gradient, also when sharded
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
    """Block-protocol bits/token on the validation split (on rank 0; None without one and elsewhere).

    Under FSDP every rank runs the same forwards (each needs the others' shards); rank 0 reports.
    """
    if "validation" not in store.split_names or not (rt.is_main or is_sharded(model)):
        return None
    result = evaluate(
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
    return result if rt.is_main else None


def checkpoint(cfg: TrainConfig, rt: Runtime, state: TrainState) -> int:
    """Save a checkpoint and publish it as model/ (every rank takes part); returns the step saved.

    Non-finite weights are never written: every rank checks them first.
    """
    bad = non_finite_weights(state.model, rt)
    if bad:
        raise DivergenceError(
            f"step {state.step}: the weights are not finite (NaN or inf in {', '.join(bad[:3])})"
        )
    notes = {
        "seed": cfg.seed,
        # Crops, dropout and the learning rate are functions of (seed, step):
        # restoring the step restores them.
        "sampler": {"kind": cfg.sampler, "next_step": state.step},
        "rng": {"torch_seed": "SeedSequence([seed, step, rank]) at every step"},
        "schedule": {"kind": cfg.schedule, "next_lr": lr_at(cfg, state.step)},
    }
    save_checkpoint(Path(cfg.out), state, notes, cfg.keep_checkpoints, rt)
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
    fsdp = cfg.parallel == "fsdp"  # FSDP needs a process group, even of one process
    rt = setup_runtime(cfg.device, cfg.precision, cfg.threads, True, fsdp, cfg.context_parallel)
    lock, finished = None, False
    try:
        mode = parallel_mode(cfg.parallel, rt.world_size, cfg.precision)
        store = TokenStore(cfg.data)
        if cfg.batch_size % (rt.dp_size * cfg.grad_accum):
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by data-parallel groups x grad_accum "
                f"= {rt.dp_size} x {cfg.grad_accum}"
            )
        inputs = [cfg.data, *([cfg.init_from] if cfg.init_from else [])]
        if not cfg.resume and not cfg.init_from:
            build_model_config(cfg, store)  # a bad model setting fails before the run directory is made
        claim = (Path(cfg.out), cfg.resume, cfg.data, inputs, cfg.overwrite)
        lock = claim_run_dir(*claim) if rt.is_main else None
        result = run_session(cfg, rt, store, mode)
        finished = True
        return result
    finally:
        if lock is not None:  # a run that failed before writing anything leaves no trace
            lock.release(abandon=not finished)
        if not finished:
            rt.close(wait=False)


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


def run_session(cfg: TrainConfig, rt: Runtime, store: TokenStore, mode: str) -> dict[str, Any]:
    """The body of ``train`` once the run directory is claimed: start, the loop, the end."""
    run_dir = Path(cfg.out)
    changes: list[str] = []
    if cfg.resume:  # the stored config is authoritative; check before loading anything
        saved = TrainConfig.from_dict(read_train_config(run_dir)).to_dict()
        changes = resume_changes(saved, cfg.to_dict())
        check_same_store(run_dir, cfg.data)

    # --- the model and optimizer: from the last checkpoint, a model directory, or a preset
    state, forward_model, notes = initial_state(cfg, store, rt, mode)
    model, model_cfg = state.model, state.model.config
    result = {"run_dir": str(run_dir), "model_dir": str(run_dir / MODEL), "rank": rt.rank, "eval": None}
    if cfg.resume and state.step >= cfg.steps:  # a finished run: say so, change nothing
        rt.close()
        return {**result, "step": state.step, "finished_before": True, "seconds": 0.0, "loss": None}
    sampler = make_sampler(
        cfg.sampler, store.split("train"), model_cfg.context_len, model_cfg.num_latents, cfg.seed
    )
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
            f"resumed at step {state.step} on {rt.world_size} process(es) ({mode})"
            + (f"; changed {', '.join(changes)}" if changes else ""),
        )
    else:
        log.note(0, f"started on {rt.world_size} process(es) ({mode}), {rt.device}", show=False)
    if state.step == 0:
        log.print(
            f"model: {model.num_parameters():,} parameters, N={model_cfg.context_len} "
            f"M={model_cfg.num_latents} E={model_cfg.input_dim} D={model_cfg.latent_dim} "
            f"L={model_cfg.num_latent_layers}; {rt.world_size} process(es) ({mode}) on {rt.device}, "
            f"{rt.precision}" + (f", each row split across {rt.cp_size}" if rt.cp_size > 1 else "")
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
