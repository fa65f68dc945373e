"""A training run's directory: its marker and lock, config, log, checkpoints and published model.

    run.json                    the marker: this directory is a training run (format, data store)
    run.lock, run.lock.json     held by the one process writing the run (and who that is)
    train_config.json           the run config (the model config lives with the weights)
    run.log                     what happened to the run: starts, resumes, changed settings, errors
    metrics.jsonl               one JSON line per step, plus eval lines
    checkpoints/step_000123/    a model directory (config.json, model.safetensors, provenance.json)
                                plus optimizer.safetensors, train_state.json, MANIFEST.json;
                                under FSDP shards/ instead of the two .safetensors (run_checkpoints.py)
    model/                      the latest weights, loadable by PerceiverAR.from_pretrained
    loss.png                    the loss curve, drawn at the end (plots.py)
    tensorboard/                when TensorBoard is installed

``train --out`` only writes a new or empty directory or a run (run.json);
one process at a time holds its lock (``filelock``: released by the kernel
when a process dies, so a killed run's lock is taken over at once). A
checkpoint counts only once its MANIFEST.json (every file with its size and
SHA-256) is written: files go to a uniquely named temporary folder, are
fsynced and renamed into place (``run_checkpoints`` writes them). A resume
verifies the newest checkpoint's checksums and falls back to the previous one
when they fail. No pickle is ever written or read. Only rank 0 writes here.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, TextIO

import torch
from filelock import FileLock, Timeout

from .checkpoint import MANIFEST_NAME, SHARDS_DIR, manifest_problem, save_model, sha256_file
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

RUN_MARKER = "run.json"
RUN_FORMAT = "perceiver-ar-run/1"
LOCK = "run.lock"
LOCK_HOLDER = "run.lock.json"
RUN_LOG = "run.log"
CHECKPOINTS = "checkpoints"
MANIFEST = MANIFEST_NAME
TRAIN_CONFIG = "train_config.json"
TRAIN_STATE = "train_state.json"
OPTIMIZER = "optimizer.safetensors"
SHARDS = SHARDS_DIR  # a sharded checkpoint's folder of DCP shards
METRICS = "metrics.jsonl"
MODEL = "model"
LOSS_PLOT = "loss.png"
TENSORBOARD = "tensorboard"

# Settings a resumed run may change (README "Safety"): they do not change what
# the model computes or the data it sees. --steps only upwards (it extends the
# schedule); the rest is evaluation, logging, checkpoint cadence and the session.
SAFE_ON_RESUME = (
    "steps",
    "stop_at",
    "eval_every",
    "eval_tokens",
    "eval_batch_size",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "progress",
    "tensorboard",
    "device",
    "threads",
    "parallel",
    "context_parallel",
)


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------
# The directory: marker and lock
# ----------------------------------------------------------------------------


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run (its marker, run.json)."""
    marker = read_json(Path(path) / RUN_MARKER)
    return isinstance(marker, dict) and str(marker.get("format", "")).startswith("perceiver-ar-run/")


def is_legacy_run(path: str | os.PathLike) -> bool:
    """A run written before run.json existed: its train_config.json and a checkpoint with our manifest."""
    path = Path(path)
    return (
        not (path / RUN_MARKER).exists()
        and isinstance(read_json(path / TRAIN_CONFIG), dict)
        and bool(list_checkpoints(path))
    )


def store_fingerprint(data_dir: str | os.PathLike) -> str | None:
    """SHA-256 of a store's meta.json: the same store, moved, keeps it; a re-prepared one changes it."""
    meta = Path(data_dir) / "meta.json"
    return sha256_file(meta) if meta.is_file() else None


def write_run_marker(run_dir: Path, data_dir: str) -> None:
    write_json(
        run_dir / RUN_MARKER,
        {
            "format": RUN_FORMAT,
            "created": now(),
            "data": str(data_dir),
            "data_meta_sha256": store_fingerprint(data_dir),
        },
    )


class RunLock:
    """The one writer of a run directory: an OS file lock on run.lock, its holder recorded in run.lock.json.

    The lock is the kernel's (``filelock`` on ``flock``): a process that dies,
    even by kill -9, releases it, so a stale lock is never in the way and a
    resume takes over at once.
    """

    def __init__(self, run_dir: Path, created: tuple[str, ...] = (), created_dir: bool = False):
        self.run_dir = run_dir
        self.created = {*created, *(() if (run_dir / LOCK).exists() else (LOCK,))}
        self.created_dir = created_dir
        self.lock = FileLock(str(run_dir / LOCK))

    def acquire(self) -> RunLock:
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            holder = self._holder()
            who = (
                f"PID {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
            )
            raise ValueError(
                f"{self.run_dir} is in use by another training process ({who}): "
                "wait for it to finish, or choose another --out"
            ) from None
        write_json(
            self.run_dir / LOCK_HOLDER, {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
        )
        return self

    def _holder(self, wait: float = 2.0) -> dict:
        """The holder's record. It is written just after the lock is taken, so a claim that lost the
        race by microseconds waits a moment for it rather than naming nobody."""
        deadline = time.monotonic() + wait
        while True:
            holder = read_json(self.run_dir / LOCK_HOLDER) or {}
            if "pid" in holder or time.monotonic() >= deadline:
                return holder
            time.sleep(0.05)

    def release(self, abandon: bool = False) -> None:
        """Let go of the run. ``abandon``: the run failed before writing anything, so the files this
        claim created (marker, lock, the folder itself) are removed again, and only those."""
        if not self.lock.is_locked:
            return
        with contextlib.suppress(OSError):
            (self.run_dir / LOCK_HOLDER).unlink()
        self.lock.release()
        if abandon and {p.name for p in self.run_dir.iterdir()} <= self.created:
            for name in self.created:
                with contextlib.suppress(OSError):
                    (self.run_dir / name).unlink()
            if self.created_dir:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.release(abandon=exc_type is not None)


# What a run writes, and all that ``train --overwrite`` removes (run.json and
# the lock stay: they are rewritten and held).
RUN_PRODUCTS = (TRAIN_CONFIG, RUN_LOG, METRICS, CHECKPOINTS, MODEL, LOSS_PLOT, TENSORBOARD)


def claim_run_dir(
    run_dir: Path, resume: bool, data_dir: str, inputs: list[str], overwrite: bool = False
) -> RunLock:
    """Check that ``run_dir`` may be written, create and mark it, and take its lock.

    A new run needs a new or empty directory or a run (run.json); a resume
    needs a run (or one written before run.json existed, which gets its
    marker now). Anything else is refused, naming the fix. ``overwrite``:
    a run's own products (``RUN_PRODUCTS``) are removed once its lock is
    held, so a run in progress is never touched; other files stay.
    """
    check_output_path(run_dir, inputs, scanned=False)
    if resume and overwrite:
        raise ValueError("--overwrite starts the run again and --resume continues it: pass one of them")
    if resume:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir} does not exist: there is no run to resume")
        if not (is_run_dir(run_dir) or is_legacy_run(run_dir)):
            raise ValueError(
                f"{run_dir} is not a training run (no {RUN_MARKER}) or has no complete checkpoint "
                "to resume from"
            )
    elif run_dir.exists() and not is_empty_dir(run_dir) and not is_run_dir(run_dir):
        raise ValueError(
            f"--out {run_dir} is not empty and is not a training run (no {RUN_MARKER}): choose another --out"
        )
    created_dir = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    created = () if (run_dir / RUN_MARKER).exists() else (RUN_MARKER,)
    if created:
        write_run_marker(run_dir, data_dir)
    lock = RunLock(run_dir, created, created_dir).acquire()
    if overwrite and not created:
        for name in RUN_PRODUCTS:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        write_run_marker(run_dir, data_dir)  # the store this run trains on
    return lock


def check_same_store(run_dir: Path, data_dir: str) -> None:
    """A resumed run trains on the store it started with (the same meta.json, wherever it now lies)."""
    marker = read_json(run_dir / RUN_MARKER) or {}
    recorded = marker.get("data_meta_sha256")
    if recorded is None:  # a run from before run.json: it records no store fingerprint
        return
    if store_fingerprint(data_dir) != recorded:
        raise ValueError(
            f"the store {data_dir} is not the one {run_dir} started on ({marker.get('data')}, which has "
            "another meta.json): resume on the original store, or start a new run"
        )


# ----------------------------------------------------------------------------
# The run config
# ----------------------------------------------------------------------------


def write_train_config(run_dir: Path, config: dict[str, Any]) -> None:
    """(Re)write the run's train_config.json, atomically."""
    write_json(run_dir / TRAIN_CONFIG, config)


def read_train_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The saved run config of ``run_dir``; a clear error when it is not a run directory."""
    path = Path(run_dir) / TRAIN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a training run directory")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} is not a JSON object: restore it from a checkpoint's run or start a new run"
        )
    return config


def flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def resume_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings a resume changes, as ``--flag old -> new``; refuses unsafe ones, listing them all.

    ``saved`` and ``new`` are complete run configs. Only ``SAFE_ON_RESUME``
    may differ, --steps only upwards; ``out``, ``resume``, ``overwrite``,
    ``stop_at`` (settings of each session) and ``data`` (whose store is checked by content
    instead) are not compared.
    """
    session = ("out", "resume", "overwrite", "data", "stop_at")
    keys = [k for k in new if k not in session and saved.get(k) != new[k]]
    refused = [f"{flag(k)} {new[k]!r} (the run's: {saved.get(k)!r})" for k in keys if k not in SAFE_ON_RESUME]
    if "steps" in keys and new["steps"] < saved["steps"]:
        refused.append(f"--steps {new['steps']} (the run's: {saved['steps']}; --steps can only grow)")
    if refused:
        safe = ", ".join(flag(k) for k in SAFE_ON_RESUME)
        raise ValueError(
            f"--resume continues the run as configured, but these settings differ from its {TRAIN_CONFIG}: "
            f"{'; '.join(refused)}. Only {safe} may change on resume; start a new run for the others"
        )
    return [f"{flag(k)} {saved.get(k)!r} -> {new[k]!r}" for k in keys]


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def is_complete(ckpt: Path) -> bool:
    """A checkpoint counts when its manifest exists and every listed file has its size.

    (A resume also checks the SHA-256 of each: ``latest_valid_checkpoint``.)
    """
    return manifest_problem(ckpt, checksums=False) is None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_valid_checkpoint(run_dir: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint whose files match their SHA-256, and a note for each newer one skipped."""
    root = run_dir / CHECKPOINTS
    candidates = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()) if root.is_dir() else [],
        key=lambda p: int(p.name[5:]),
        reverse=True,
    )
    notes = []
    for ckpt in candidates:
        problem = manifest_problem(ckpt)
        if problem is None:
            return ckpt, notes
        notes.append(f"checkpoint {ckpt.relative_to(run_dir)} is corrupt or incomplete ({problem}): skipped")
    if notes:
        raise FileNotFoundError(
            f"{run_dir} has no complete checkpoint to resume from ({len(notes)} corrupt or incomplete: "
            f"{notes[0]}); start the run again without --resume"
        )
    raise FileNotFoundError(
        f"{run_dir} has no complete checkpoint to resume from: start the run again without --resume"
    )


def publish_model(model: PerceiverAR, run_dir: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Replace RUN_DIR/model with the current weights (written aside, fsynced, then swapped in).

    ``weights``: the whole weights when ``model`` holds only a shard of them (FSDP, gathered on rank 0).
    """
    final = run_dir / MODEL
    tmp = temp_dir_beside(final)
    try:
        save_model(model if weights is None else weights, model.config, tmp, model.provenance)
        return publish_dir(tmp, final)
    except BaseException:
        remove_temp(tmp)
        raise


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
        self.run_dir = run_dir
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

    def note(self, step: int, text: str, show: bool = True) -> None:
        """An event of the run (a resume, a changed setting, a skipped checkpoint), printed and in run.log."""
        if self.enabled:
            if show:
                self.bar.write(text)
            with open(self.run_dir / RUN_LOG, "a") as f:
                f.write(f"{now()} step {step}: {text}\n")

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
