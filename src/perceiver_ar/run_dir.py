"""A training run's directory: its config, metrics log, checkpoints and published model.

    train_config.json           the run config (the model config lives with the weights)
    metrics.jsonl               one JSON line per step, plus eval lines
    checkpoints/step_000123/    config.json + model.safetensors (a model directory),
                                optimizer.safetensors, train_state.json, MANIFEST.json
    model/                      the latest weights, loadable by PerceiverAR.from_pretrained
    loss.png                    the loss curve, drawn at the end (plots.py)
    tensorboard/                when TensorBoard is installed

A checkpoint counts only once its MANIFEST.json is written (files go to a
temporary folder that is renamed into place); the last ``keep`` are kept.
No pickle is ever written or read: tensors go through safetensors,
everything else through JSON. Only rank 0 writes here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from safetensors.torch import load_file, save_file

from .model import PerceiverAR

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
TRAIN_CONFIG = "train_config.json"
TRAIN_STATE = "train_state.json"
OPTIMIZER = "optimizer.safetensors"
METRICS = "metrics.jsonl"
MODEL = "model"
LOSS_PLOT = "loss.png"
TENSORBOARD = "tensorboard"


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


# ----------------------------------------------------------------------------
# The run config
# ----------------------------------------------------------------------------


def write_train_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Create the run directory and (re)write its train_config.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / TRAIN_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_train_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The saved run config of ``run_dir``; a clear error when it is not a run directory."""
    path = Path(run_dir) / TRAIN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a training run directory")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, state: TrainState, notes: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step_N atomically (temp folder, manifest last, rename); keep the last ``keep``.

    ``notes`` go into train_state.json for people reading it; a resume reads
    only the step and the optimizer from it.
    """
    step = state.step
    root = run_dir / CHECKPOINTS
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state.model.save_pretrained(tmp)
    # The optimizer's tensors (moments, step counts) go to safetensors, its
    # scalars and parameter groups to JSON.
    opt_state = state.optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in opt_state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(tmp / OPTIMIZER))
    record = {
        **notes,
        "step": step,
        "optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars},
    }
    if state.scaler.is_enabled():
        record["grad_scaler"] = state.scaler.state_dict()  # floats and ints
    (tmp / TRAIN_STATE).write_text(json.dumps(record, indent=2) + "\n")
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


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def last_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint, the one a resume starts from."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to resume from")
    return checkpoints[-1]


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, ckpt: Path, scaler: torch.amp.GradScaler | None = None
) -> int:
    """Restore the optimizer (and an enabled gradient scaler) from a checkpoint; returns its step.

    A scaler saved by an fp16 run is restored only into an fp16 run; any other
    run starts its scaler afresh (a bf16 or fp32 resume has none).
    """
    state = json.loads((ckpt / TRAIN_STATE).read_text())
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    tensors = load_file(str(ckpt / OPTIMIZER))
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *state["optimizer"]["scalars"].items()]:
        pid, key = name.split(".", 1)
        per_param.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    return int(state["step"])


def publish_model(model: PerceiverAR, run_dir: Path) -> Path:
    """Replace RUN_DIR/model with the current weights (written aside, then swapped in)."""
    final, tmp, old = run_dir / MODEL, run_dir / f".{MODEL}.tmp", run_dir / f".{MODEL}.old"
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
# The log: metrics.jsonl, TensorBoard and the progress bar
# ----------------------------------------------------------------------------


class RunLog:
    """What a run records as it goes. Disabled (every rank but 0), it writes and prints nothing."""

    def __init__(
        self, run_dir: Path, step: int, total: int, enabled: bool, progress: bool, tensorboard: bool
    ) -> None:
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.metrics = self.writer = None
        if enabled:
            self.metrics = open_metrics(run_dir, step)
            if tensorboard:
                with contextlib.suppress(ImportError):
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(run_dir / TENSORBOARD))
        self.bar = tqdm(total=total, initial=step, disable=not (enabled and progress), unit="step")

    def print(self, text: str) -> None:
        """A line above the progress bar."""
        if self.enabled:
            self.bar.write(text)

    def write(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def step(self, record: dict[str, Any], show: bool) -> None:
        """One training step's record; ``show`` also updates the bar's figures and TensorBoard."""
        self.write(record)
        self.bar.update(1)
        if show:
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                bpt=f"{record['bits_per_token']:.3f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                lr=f"{record['lr']:.2e}",
            )
            if self.writer is not None:
                for key in ("loss", "bits_per_token", "lr", "grad_norm", "tokens_per_s"):
                    self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def eval(self, step: int, result: dict[str, Any] | None) -> dict[str, Any] | None:
        """Record a validation result (None: none was run) and pass it on."""
        if result is not None:
            self.write({"step": step, "eval": result})
            if self.writer is not None:
                self.writer.add_scalar("eval/bits_per_token", result["bits_per_token"], step)
            self.print(f"step {step}: validation {result['bits_per_token']:.4f} bits/token")
        return result

    def close_bar(self) -> None:
        self.bar.close()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()


def open_metrics(run_dir: Path, step: int) -> TextIO:
    """metrics.jsonl opened to append, without the lines past ``step`` (a resumed run redoes them)."""
    path = run_dir / METRICS
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept))
    return open(path, "a")  # noqa: SIM115
