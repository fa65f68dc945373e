"""The copy task of the paper (section 5.1): random bytes, then the same bytes mirrored.

A sequence of length N is laid out exactly as the official
``RandomMirroredDataset`` makes it: SOS, then h = (N - 2) / 2 random data
tokens (bytes offset by 3, ids 3..258), then the same h tokens in reverse
order, then EOS. Positions are 1..N. The first half cannot be predicted; the
mirrored half can, but the token at event index h + 1 + k copies the one at
h - k, a distance of 2k + 1 back, so the last tokens of a long sequence need
the whole context.

``copy_accuracy`` scores a model with teacher forcing on the mirrored half
(targets at event indices h+1..2h), overall and bucketed by copy distance.

``centred_windows`` and ``WidthCurriculum`` are the training curriculum that
takes the task past the plateau at long N (docs/long_context.md): train on
windows of the N-sequence centred on the mirror point, at their absolute
positions, and double the window when the mirror is learned at that width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .vocab import EOS_ID, SOS_ID, TOKEN_OFFSET

NUM_BYTE_VALUES = 256
VOCAB_SIZE = NUM_BYTE_VALUES + TOKEN_OFFSET  # 259


def half_length(length: int) -> int:
    """h, the number of random tokens in a copy sequence of ``length`` events."""
    if length < 4 or length % 2:
        raise ValueError(f"a copy sequence needs an even length >= 4 (SOS + 2h + EOS), got {length}")
    return (length - 2) // 2


def copy_sequences(num: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` copy sequences of ``length`` events, [num, length] int64.

    Row layout: [SOS, b_1 .. b_h, b_h .. b_1, EOS] with b drawn uniformly
    from the 256 data tokens (ids 3..258).
    """
    h = half_length(length)
    first = rng.integers(TOKEN_OFFSET, VOCAB_SIZE, size=(num, h), dtype=np.int64)
    rows = np.empty((num, length), dtype=np.int64)
    rows[:, 0] = SOS_ID
    rows[:, 1 : h + 1] = first
    rows[:, h + 1 : 2 * h + 1] = first[:, ::-1]
    rows[:, -1] = EOS_ID
    return rows


def copy_distance(length: int) -> np.ndarray:
    """Copy distance of each mirrored target, [h]: event h+1+k copies event h-k, 2k+1 back."""
    h = half_length(length)
    return 2 * np.arange(h) + 1


def write_copy_store(
    out_dir: str | Path,
    length: int,
    num_train: int = 10_000,
    num_validation: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a data store of copy sequences (train and validation splits).

    Each document is one full sequence of ``length`` events; splits draw
    from separate seeds, as the official loader does per split. ``overwrite``:
    replace an existing store at ``out_dir`` (see ``store.check_store_output``).
    """
    from .store import StoreWriter

    h = half_length(length)
    meta = {
        "modality": "copy",
        # The data tokens are bytes (ids 3..258): the byte tokenizer's entry, so
        # evaluation reports bits per byte and samples decode as text.
        "tokenizer": {"type": "bytes", "vocab_size": VOCAB_SIZE},
        "copy": {"length": length, "half_length": h, "seed": seed},
    }
    with StoreWriter(out_dir, vocab_size=VOCAB_SIZE, meta=meta, overwrite=overwrite) as writer:
        for split, num, split_seed in (("train", num_train, seed), ("validation", num_validation, seed + 1)):
            rng = np.random.default_rng([split_seed, length])
            for start in range(0, num, 256):
                for row in copy_sequences(min(256, num - start), length, rng):
                    writer.add(split, row)
        return writer.close()


def training_crops(events: Tensor, min_length: int, generator: torch.Generator | None = None) -> Tensor:
    """Official-style training crops: each row keeps a random prefix of >= ``min_length`` events.

    The official pipeline crops copy sequences to a length drawn uniformly
    from [minimum_crop_length, N] and right-pads them. [B, N] -> [B, N].
    """
    B, N = events.shape
    lengths = torch.randint(min(min_length, N), N + 1, (B,), generator=generator)
    keep = torch.arange(N)[None, :] < lengths[:, None]
    return torch.where(keep, events, torch.zeros_like(events))


@dataclass
class CopyAccuracy:
    """Teacher-forced accuracy on the mirrored half of copy sequences."""

    length: int
    num_sequences: int
    accuracy: float
    correct: int
    total: int
    # One entry per distance bucket [lo, hi]: correct and total counts.
    buckets: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        lines = [
            f"copy N={self.length}: mirrored-half accuracy {100 * self.accuracy:.2f}% "
            f"({self.correct}/{self.total} tokens, {self.num_sequences} sequences)"
        ]
        lines.append("  distance        accuracy   tokens")
        for b in self.buckets:
            lines.append(
                f"  {int(b['lo']):>6}-{int(b['hi']):<7} {100 * b['accuracy']:7.2f}%  {int(b['total']):>7}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "length": self.length,
            "num_sequences": self.num_sequences,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "buckets": self.buckets,
            "seconds": self.seconds,
        }


def distance_buckets(length: int) -> list[tuple[int, int]]:
    """Power-of-two distance buckets [1, 1], [2, 3], [4, 7], ... up to 2h - 1."""
    max_d = 2 * half_length(length) - 1
    return [(2**i, min(2 ** (i + 1) - 1, max_d)) for i in range(int(math.log2(max_d)) + 1)]


@torch.no_grad()
def copy_accuracy(
    model: torch.nn.Module,
    sequences: np.ndarray | Tensor,
    num_latents: int | None = None,
    batch_size: int = 8,
) -> CopyAccuracy:
    """Accuracy of greedy next-token predictions on the mirrored half, by copy distance.

    ``sequences`` [S, N] are full copy sequences. Each forward sees a prefix
    of the sequence (inputs are events[:e]) and its M latents predict
    events[e - M + 1 .. e]; prefixes end every M targets, so each mirrored
    target is scored exactly once with all the context before it.
    """
    import time

    t0 = time.perf_counter()
    seqs = torch.as_tensor(np.asarray(sequences), dtype=torch.long)
    S, N = seqs.shape
    h = half_length(N)
    M = int(num_latents or model.config.num_latents)
    was_training = model.training
    model.eval()
    correct = torch.zeros(h, dtype=torch.long)  # per mirrored target k
    # Target at event index h+1+k is predicted from input index h+k.
    ends = list(range(h + M, 2 * h, M)) + [2 * h]  # prefix lengths e (inputs events[:e])
    first_new = h
    for e in ends:
        m = min(M, e)
        for b0 in range(0, S, batch_size):
            batch = seqs[b0 : b0 + batch_size]
            out = model(batch[:, :e], num_latents=m)
            pred = out.logits.argmax(-1)  # [B, m], latent i sits on input e - m + i
            lo = max(first_new, e - m)  # input indices scored by this prefix
            sel = slice(lo - (e - m), m)
            truth = batch[:, lo + 1 : e + 1]
            correct[lo - h : e - h] += (pred[:, sel] == truth).sum(0)
        first_new = e
    model.train(was_training)

    dist = torch.as_tensor(copy_distance(N))
    buckets = []
    for lo, hi in distance_buckets(N):
        sel = (dist >= lo) & (dist <= hi)
        n = int(sel.sum()) * S
        if n == 0:
            continue
        c = int(correct[sel].sum())
        buckets.append({"lo": lo, "hi": hi, "correct": c, "total": n, "accuracy": c / n})
    total = h * S
    c = int(correct.sum())
    return CopyAccuracy(
        length=N,
        num_sequences=S,
        accuracy=c / total,
        correct=c,
        total=total,
        buckets=buckets,
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------
# The centred-window curriculum
# ----------------------------------------------------------------------------


def check_window_width(length: int, width: int) -> None:
    """Refuse a window that is not a centred slice of a copy sequence of ``length`` events."""
    h = half_length(length)
    if width != length and not (2 <= width <= 2 * h and width % 2 == 0):
        raise ValueError(
            f"a centred window of a copy sequence of {length} events needs an even width in "
            f"[2, {2 * h}] or the whole length {length}, got {width}"
        )


def centred_windows(
    num: int, length: int, width: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` windows of ``width`` events of copy sequences of ``length``, centred on the mirror point.

    Returns events and their absolute positions, both [num, width] int64. A
    window holds the last width/2 random tokens of the first half and the
    first width/2 of the mirrored half (event indices h+1-width/2 .. h+width/2),
    at the positions those events have in the full sequence, so what the
    model learns at a small width is already the mirror at its final place:
    widening the window only adds longer copy distances at new positions.
    ``width == length`` is the whole sequence (SOS and EOS included).
    """
    check_window_width(length, width)
    if width == length:
        events = copy_sequences(num, length, rng)
        first_index = 0
    else:
        half = width // 2
        first = rng.integers(TOKEN_OFFSET, VOCAB_SIZE, size=(num, half), dtype=np.int64)
        events = np.concatenate([first, first[:, ::-1]], axis=1)
        first_index = half_length(length) + 1 - half
    # Event index i sits at position i + 1 (positions are 1..N).
    positions = np.broadcast_to(np.arange(first_index + 1, first_index + width + 1), (num, width)).copy()
    return events, positions


@dataclass
class WidthCurriculum:
    """The window width of the centred-window curriculum and its growth rule.

    Starts at ``start_width`` and doubles (capped at ``length``, the whole
    sequence) once the mean training accuracy on the mirrored targets over
    the last ``window`` steps at the current width reaches ``grow_at``, after
    at least ``min_steps`` steps there. Growing only on accuracy, not on a
    step schedule, is what keeps every width short: the mirror is found
    quickly when few inputs compete for attention, and each doubling only has
    to extend it.
    """

    length: int
    start_width: int = 64
    grow_at: float = 0.97
    window: int = 20
    min_steps: int = 5
    width: int = field(init=False)
    recent: list[float] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        check_window_width(self.length, min(self.start_width, self.length))
        if not 0.0 <= self.grow_at <= 1.0:
            raise ValueError(f"grow_at is an accuracy in [0, 1], got {self.grow_at}")
        if self.window < 1 or self.min_steps < 1:
            raise ValueError(f"window and min_steps must be >= 1, got {self.window} and {self.min_steps}")
        self.width = min(self.start_width, self.length)

    @property
    def done(self) -> bool:
        """True once the window is the whole sequence."""
        return self.width == self.length

    def update(self, accuracy: float) -> bool:
        """Record one step's training accuracy; True when the width grew."""
        self.recent = [*self.recent, accuracy][-self.window :]
        if self.done or len(self.recent) < min(self.window, self.min_steps):
            return False
        if sum(self.recent) / len(self.recent) < self.grow_at:
            return False
        wider = 2 * self.width
        # The last step is the whole sequence; a window cannot hold more than 2h events.
        self.width = self.length if wider > 2 * half_length(self.length) else wider
        self.recent = []
        return True
