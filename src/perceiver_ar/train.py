"""Training: ``TrainConfig`` (the run config) and ``train(cfg)``, one loop read top to bottom.

A run directory holds:

    train_config.json           the run config (the model config lives with the weights)
    metrics.jsonl               one JSON line per step, plus eval lines
    checkpoints/step_000123/    config.json + model.safetensors (a model directory),
                                optimizer.safetensors, train_state.json, MANIFEST.json
    model/                      the latest weights, loadable by PerceiverAR.from_pretrained
    loss.png                    the loss curve, drawn at the end
    tensorboard/                when TensorBoard is installed

A checkpoint counts only once its MANIFEST.json is written (files go to a
temporary folder that is renamed into place); the last ``keep_checkpoints``
are kept. No pickle is ever written or read: tensors go through safetensors,
everything else through JSON.

Resuming is exact because everything random is a function of (seed, step):
the crops of step s come from ``sampler.crops(s)`` and every step reseeds
torch (dropout) from (seed, step, rank). So the state to save is the step,
the weights and the optimizer moments.

Under ``torchrun`` each rank takes its own slice of the global batch and the
loss is normalised by the global number of target tokens, so 2 processes
compute the gradients of 1 process with the doubled batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import PerceiverARConfig
from .data import crops_to_batch, make_sampler, max_position, targets_per_row
from .evaluate import evaluate, unigram_log2p
from .loss import perceiver_ar_loss, shift_events
from .model import PerceiverAR
from .runtime import setup_runtime
from .store import TokenStore

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    """How to train: data, model preset and overrides, optimisation, logging."""

    data: str = ""  # a store written by `perceiver-ar prepare`
    out: str = "runs/run"  # the run directory
    preset: str = "demo"  # model preset (see perceiver_ar.config.PRESETS)
    model: dict[str, Any] = field(default_factory=dict)  # model config fields overriding the preset
    init_from: str | None = None  # start from this model directory's weights and config
    resume: bool = False  # continue the run in `out` from its last checkpoint
    steps: int = 1000  # optimizer steps in all (the schedule's length)
    stop_at: int = 0  # end this session at this step, checkpointed, as if interrupted (0: at `steps`)
    batch_size: int = 16  # rows per optimizer step, over all ranks and accumulation micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step (each rank)
    sampler: str = "crops"  # "crops", "document-crops" (official weighting) or "stream" (fixed windows)
    optimizer: str = "adamw"  # "adamw", "adam" or "sgd"
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    schedule: str = "cosine"  # "cosine" or "constant" after the warm-up
    warmup_steps: int = 100  # linear warm-up from 0
    weight_decay: float = 0.0  # decoupled (AdamW) on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global gradient-norm clip; 0 turns it off
    seed: int = 0  # model init, crops and dropout
    eval_every: int = 500  # steps between evaluations; 0: only at the end
    eval_tokens: int = 32768  # validation targets per evaluation (block protocol)
    eval_batch_size: int = 8
    checkpoint_every: int = 500  # steps between checkpoints; the last step always saves
    keep_checkpoints: int = 3
    log_every: int = 10  # steps between progress-bar and TensorBoard updates
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"
    threads: int = 0  # CPU threads per process; 0: cores / local processes
    compile: bool = False  # torch.compile the training forward (opt-in)
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # also log to TensorBoard when it is installed

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
    path = Path(run_dir) / TRAIN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a training run directory")
    d = json.loads(path.read_text())
    d["stop_at"] = 0  # a session setting: the resumed session runs on unless told otherwise
    d.update(overrides, out=str(run_dir), resume=True)
    return TrainConfig.from_dict(d)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank (dropout masks)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


# ----------------------------------------------------------------------------
# Learning rate
# ----------------------------------------------------------------------------


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
# Checkpoints
# ----------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path, step: int, model: PerceiverAR, optimizer: torch.optim.Optimizer, state: dict, keep: int
) -> Path:
    """Write checkpoints/step_N atomically (temp folder, manifest last, rename); keep the last ``keep``."""
    root = run_dir / CHECKPOINTS
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    # The optimizer's tensors (moments, step counts) go to safetensors, its
    # scalars and parameter groups to JSON.
    opt_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in opt_state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        **state,
        "step": step,
        "optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars},
    }
    (tmp / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def is_complete(ckpt: Path) -> bool:
    """A checkpoint counts when its manifest exists and every listed file has its size."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        return all(
            (ckpt / n).is_file() and (ckpt / n).stat().st_size == s for n, s in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: Path) -> dict:
    """Restore the optimizer from a checkpoint; returns the checkpoint's train state."""
    state = json.loads((ckpt / "train_state.json").read_text())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *state["optimizer"]["scalars"].items()]:
        pid, key = name.split(".", 1)
        per_param.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    return state


def publish_model(model: PerceiverAR, run_dir: Path) -> Path:
    """Replace RUN_DIR/model with the current weights (written aside, then swapped in)."""
    final, tmp, old = run_dir / "model", run_dir / ".model.tmp", run_dir / ".model.old"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    model.save_pretrained(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


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


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a run; returns the final metrics, last eval and the run's paths."""
    rt = setup_runtime(cfg.device, cfg.precision, cfg.threads, distributed=True)
    run_dir = Path(cfg.out)
    store = TokenStore(cfg.data)
    train_split = store.split("train")
    val_split = store.split("validation") if "validation" in store.split_names else None
    if cfg.batch_size % (rt.world_size * cfg.grad_accum):
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
            f"= {rt.world_size} x {cfg.grad_accum}"
        )
    micro_batch = cfg.batch_size // (rt.world_size * cfg.grad_accum)

    # --- the model: from the last checkpoint, a model directory, or a preset
    ckpt = None
    if cfg.resume:
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint to resume from")
        ckpt = checkpoints[-1]
        model = PerceiverAR.from_pretrained(ckpt)
    elif list_checkpoints(run_dir):
        raise ValueError(
            f"{run_dir} already holds checkpoints: pass --resume {run_dir} or choose another --out"
        )
    elif cfg.init_from:
        model = PerceiverAR.from_pretrained(cfg.init_from)
    else:
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        model = PerceiverAR(build_model_config(cfg, store))
    model_cfg = model.config
    check_model_fits_data(model_cfg, cfg.sampler, store)
    model.to(rt.device)
    optimizer = make_optimizer(cfg, model)
    step = 0
    if ckpt is not None:
        step = int(load_optimizer_state(optimizer, ckpt)["step"])
    sampler = make_sampler(cfg.sampler, train_split, model_cfg.context_len, model_cfg.num_latents, cfg.seed)

    # The module that runs the forward: DDP syncs gradients across ranks.
    forward_model: Any = model
    if rt.world_size > 1:
        ddp_ids = [rt.device.index] if rt.device.type == "cuda" else None
        forward_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ddp_ids)
    if cfg.compile:
        forward_model = torch.compile(forward_model)

    # --- logging (rank 0 only writes anything)
    metrics_file = writer = None
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / TRAIN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        metrics_path = run_dir / METRICS
        if metrics_path.exists():  # drop lines past the checkpoint we resume from
            lines = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
        metrics_file = open(metrics_path, "a")  # noqa: SIM115
        if cfg.tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(run_dir / "tensorboard"))
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not (rt.is_main and cfg.progress), unit="step")
    print_fn = bar.write if rt.is_main else (lambda *_: None)
    if rt.is_main and step == 0:
        print_fn(
            f"model: {model.num_parameters():,} parameters, N={model_cfg.context_len} "
            f"M={model_cfg.num_latents} E={model_cfg.input_dim} D={model_cfg.latent_dim} "
            f"L={model_cfg.num_latent_layers}; {rt.world_size} process(es) on {rt.device}, "
            f"{rt.precision}"
        )

    def log(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    baseline = unigram_log2p(train_split, store.vocab_size) if rt.is_main else None

    def run_eval() -> dict[str, Any] | None:
        if val_split is None or not rt.is_main:
            return None
        result = evaluate(
            model,
            val_split,
            protocol="block",
            meta=store.meta,
            batch_size=cfg.eval_batch_size,
            max_tokens=cfg.eval_tokens,
            device=rt.device,
            autocast_dtype=rt.autocast_dtype,
            baseline_log2p=baseline,
        )
        log({"step": step, "eval": result})
        if writer is not None:
            writer.add_scalar("eval/bits_per_token", result["bits_per_token"], step)
        print_fn(f"step {step}: validation {result['bits_per_token']:.4f} bits/token")
        return result

    last_checkpoint = step if ckpt is not None else -1

    def checkpoint() -> None:
        nonlocal last_checkpoint
        last_checkpoint = step
        if rt.is_main:
            state = {
                "seed": cfg.seed,
                # Crops, dropout and the learning rate are functions of (seed, step):
                # restoring the step restores them.
                "sampler": {"kind": cfg.sampler, "next_step": step},
                "rng": {"torch_seed": "SeedSequence([seed, step, rank]) at every step"},
                "schedule": {"kind": cfg.schedule, "next_lr": lr_at(cfg, step)},
            }
            save_checkpoint(run_dir, step, model, optimizer, state, cfg.keep_checkpoints)
            publish_model(model, run_dir)

    # --- train
    model.train()
    last_eval = None
    last: dict[str, Any] = {}
    t0 = time.perf_counter()
    end_step = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
    while step < end_step:
        t_step = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The global batch of this step is the same on every rank; each takes
        # its slice. Dividing by the global target count makes the DDP average
        # of the ranks' gradients the gradient of the per-token mean loss.
        crops = sampler.crops(step, cfg.batch_size)
        global_targets = int(targets_per_row(crops, model_cfg.num_latents).sum())
        local = crops[rt.rank * cfg.batch_size // rt.world_size :][: cfg.batch_size // rt.world_size]
        torch.manual_seed(step_seed(cfg.seed, step, rt.rank))
        sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss, CE, input tokens
        for micro in range(cfg.grad_accum):
            events, positions = crops_to_batch(
                train_split,
                store.meta,
                local[micro * micro_batch : (micro + 1) * micro_batch],
                model_cfg.context_len,
            )
            inputs, targets = shift_events(torch.from_numpy(events).to(rt.device))
            positions = torch.from_numpy(positions).to(rt.device)
            # Only the last micro-step syncs gradients across ranks.
            sync = micro == cfg.grad_accum - 1 or rt.world_size == 1
            with contextlib.nullcontext() if sync else forward_model.no_sync(), rt.autocast():
                out = forward_model(inputs, positions)
                loss = perceiver_ar_loss(out.logits, targets, out.latent_index, model_cfg.z_loss)
            (loss.total * (rt.world_size / global_targets)).backward()
            sums += torch.stack(
                [loss.total.detach().double(), loss.total_ce.detach().double(), (inputs != 0).sum().double()]
            )
        if rt.world_size > 1:
            dist.all_reduce(sums)  # a sync point: every rank waits for the slowest
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        seconds = time.perf_counter() - t_step
        loss_mean = float(sums[0]) / global_targets
        bits = float(sums[1]) / global_targets / math.log(2)
        last = {
            "step": step,
            "loss": loss_mean,
            "bits_per_token": bits,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": float(sums[2]) / seconds,
            "targets": global_targets,
            "seconds": seconds,
        }
        log(last)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            bar.set_postfix(
                loss=f"{loss_mean:.3f}",
                bpt=f"{bits:.3f}",
                tok_s=f"{last['tokens_per_s']:.0f}",
                lr=f"{lr:.2e}",
            )
            if writer is not None:
                for key in ("loss", "bits_per_token", "lr", "grad_norm", "tokens_per_s"):
                    writer.add_scalar(f"train/{key}", last[key], step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < end_step:
            last_eval = run_eval()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < end_step:
            checkpoint()

    # --- the end: a final evaluation, checkpoint and loss plot
    bar.close()
    if step == cfg.steps:  # not when stopped early: the run goes on later
        last_eval = run_eval() or last_eval
    if last_checkpoint != step:
        checkpoint()
    train_seconds = time.perf_counter() - t0
    if rt.is_main:
        plot_losses(run_dir / METRICS, run_dir / "loss.png")
        metrics_file.close()
        if writer is not None:
            writer.close()
    rt.close()  # waits until rank 0 has written the last checkpoint
    return {
        "run_dir": str(run_dir),
        "model_dir": str(run_dir / "model"),
        "step": step,
        "loss": last.get("loss"),
        "bits_per_token": last.get("bits_per_token"),
        "eval": last_eval,
        "seconds": train_seconds,
        "rank": rt.rank,
    }


def plot_losses(metrics_path: Path, out_path: Path) -> Path | None:
    """Train bits/token per step (and its running mean) with the validation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, bits, eval_steps, eval_bits = [], [], [], []
    unigram = None
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "eval" in rec:
            eval_steps.append(rec["step"])
            eval_bits.append(rec["eval"]["bits_per_token"])
            unigram = rec["eval"].get("unigram_bits_per_token", unigram)
        elif "bits_per_token" in rec:
            steps.append(rec["step"])
            bits.append(rec["bits_per_token"])
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, bits, color="tab:blue", alpha=0.3, lw=1, label="train (per step)")
    window = max(1, len(bits) // 50)
    if window > 1:
        smooth = np.convolve(bits, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", lw=2, label=f"train (mean of {window})")
    if eval_steps:
        ax.plot(eval_steps, eval_bits, "o-", color="tab:orange", label="validation")
    if unigram is not None:
        ax.axhline(unigram, color="grey", ls="--", lw=1, label="unigram baseline (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
