"""A training run's config (``TrainConfig``) and the model config it implies for a store.

Each ``TrainConfig`` field carries its help text and value check, so the
``perceiver-ar train`` flags are built from the fields (``commands/train.py``)
and a bad value is refused in one line wherever it comes from. The model
config of a new run is the preset plus overrides, sized to the store
(vocabulary, absolute position tables); ``train.py`` runs the loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import checks
from .config import PRESETS, PerceiverARConfig
from .parallel import PARALLEL_HELP, PARALLEL_MODES
from .runtime import PRECISIONS
from .samplers import max_position
from .store import TokenStore


def option(default: Any, text: str, check: checks.Check) -> Any:
    """A TrainConfig field, its help text and its value check, shared with its ``perceiver-ar train`` flag."""
    return field(default=default, metadata={"help": text, "check": check})


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
    overwrite: bool = option(
        False,
        "start again in --out if it is a training run (run.json) that no process holds: its checkpoints, "
        "model and logs are removed first, other files kept; anything else is refused",
        checks.boolean,
    )
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
    parallel: str = option("auto", PARALLEL_HELP, checks.choice(*PARALLEL_MODES))
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


# ----------------------------------------------------------------------------
# The model a run config implies
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
