"""Training batches drawn from a token store, and the positions of their tokens.

``RandomCrops`` makes batches as the official pipeline does; ``StreamWindows``
cuts fixed windows from the concatenated documents. Both are pure functions
of (seed, step), so a sampler's state is the step counter and a resumed or
distributed run draws exactly the crops the uninterrupted single-process run
would. ``check_batch`` validates a batch on the host, where it enters, so the
model's forward need not read tensor values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import PerceiverARConfig
from .store import Split
from .vocab import PAD_ID

# ----------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------


# "axes": (row, column, channel) per token for absolute per-axis tables;
# "flat": 1..length, for rotary over the flat sequence.
IMAGE_POSITION_KINDS = ("axes", "flat")


def image_positions(shape: tuple[int, int, int], start: int, length: int) -> np.ndarray:
    """Absolute (row, column, channel) indices of image document tokens start..start+length-1.

    Token 0 of a document is SOS at (0, 0, 0); token i >= 1 is subpixel i - 1
    at (row + 1, column + 1, channel + 1), subpixels in raster order with the
    channels of a pixel interleaved. Returns int64 [length, 3].
    """
    H, W, C = shape
    i = np.arange(start, start + length, dtype=np.int64)
    if length and (i[0] < 0 or i[-1] > H * W * C):
        raise ValueError(
            f"tokens {start}..{start + length - 1} lie outside an image document of shape {shape}"
        )
    k = i - 1  # subpixel index; -1 for SOS
    pos = np.stack([k // (W * C) + 1, (k // C) % W + 1, k % C + 1], axis=1)
    pos[i == 0] = 0
    return pos


def crop_positions(meta: dict[str, Any], start: int, length: int) -> np.ndarray:
    """Positions of document tokens start..start+length-1 of an image store.

    ``meta["image_positions"]`` is "axes" (the official per-axis tables:
    [length, 3]) or "flat" (1-based over the sequence: [length], for rotary).
    """
    kind = meta.get("image_positions", "axes")
    if kind == "flat":
        return np.arange(start + 1, start + length + 1, dtype=np.int64)
    if kind != "axes":
        raise ValueError(f"unknown image_positions {kind!r} in the store's meta.json: 'axes' or 'flat'")
    return image_positions(tuple(meta["image_shape"]), start, length)


def positions_for_crop(meta: dict[str, Any], start: int, length: int) -> np.ndarray:
    """1-based positions of ``length`` events starting at document index ``start``.

    Text (and every 1-D modality): [length] = start+1 .. start+length. Images
    follow their store's ``image_positions``: [length, 3] (row, column,
    channel) for the official per-axis tables, or flat 1-D positions.
    """
    modality = meta.get("modality", "text")
    if modality in ("text", "music", "audio", "copy", "tokens"):
        return np.arange(start + 1, start + length + 1, dtype=np.int64)
    if modality == "image":
        return crop_positions(meta, start, length)
    raise ValueError(f"no position rule for modality {modality!r}")


def max_position(meta: dict[str, Any], max_doc_len: int) -> np.ndarray:
    """The largest position on each axis that documents up to ``max_doc_len`` events reach."""
    pos = positions_for_crop(meta, max_doc_len - 1, 1)
    return np.atleast_1d(pos.reshape(-1) if pos.ndim == 1 else pos[-1])


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------
# A crop is (doc, start, end): events split[doc][start:end]. In stream mode
# doc is -1 and start/end index the split's concatenated token array.


def crops_to_batch(
    split: Split, meta: dict[str, Any], crops: np.ndarray, context_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded events [B, N+1] and input positions [B, N] (or [B, N, axes]), 0 on padding."""
    B = len(crops)
    events = np.full((B, context_len + 1), PAD_ID, dtype=np.int64)
    positions = None
    for row, (doc, start, end) in enumerate(crops):
        n = end - start
        tokens = split.tokens[start:end] if doc < 0 else split[doc][start:end]
        events[row, :n] = tokens
        # Inputs are events[:-1]: the crop's last event is only a target.
        pos = positions_for_crop(meta, 0 if doc < 0 else start, n - 1)
        if positions is None:
            positions = np.zeros((B, context_len, *pos.shape[1:]), dtype=np.int64)
        positions[row, : n - 1] = pos
    return events, positions


def check_batch(tokens: np.ndarray, positions: np.ndarray | None, config: PerceiverARConfig) -> bool:
    """Check a right-padded batch on the host: ids [B, T], positions; return whether no row has padding.

    The trainer and the evaluator check their batches here, in numpy, before
    they reach the device, and then call the model with ``validate=False`` and
    this ``full_rows``: the model's own check reads device tensors (a host
    sync per step on a GPU, a graph break under compile).
    """
    V = config.vocab_size
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
        raise ValueError(
            f"token ids must lie in [0, {V}) for the model's vocab_size {V}, "
            f"got ids from {int(tokens.min())} to {int(tokens.max())}: use data made with its tokenizer"
        )
    pad = tokens == PAD_ID
    if bool((pad[:, :-1] & ~pad[:, 1:]).any()):
        raise ValueError(f"a document holds PAD ({PAD_ID}) before its end: PAD may only pad a row's end")
    if positions is not None and config.position_encoding == "absolute" and positions.size:
        axes = positions if positions.ndim == 3 else positions[..., None]
        for axis, size in enumerate(config.position_table_sizes):
            hi = int(axes[..., axis].max())
            if hi >= size:
                raise ValueError(
                    f"position {hi} on axis {axis} is outside the position table of {size} rows: "
                    "raise position_table_sizes or use rotary positions"
                )
    return not bool(pad.any())


def targets_per_row(crops: np.ndarray, num_latents: int) -> np.ndarray:
    """Tokens the loss counts in each row: min(M, crop length - 1).

    A crop of n events has n - 1 inputs with a target; the latents sit on the
    last M of them. Knowing this before the forward lets every rank and every
    accumulation micro-step divide by the same global token count.
    """
    return np.minimum(num_latents, crops[:, 2] - crops[:, 1] - 1)


class RandomCrops:
    """The official training crops: each ends at a uniformly random position of a document.

    Every crop holds at least ``min(M + 1, document length)`` events, so all
    M latents are trained whenever the document allows, and at most N + 1
    (N inputs plus the last target). Crops that end early in a document are
    shorter: short contexts are trained too. A crop end is drawn uniformly
    over all valid ends of the split (documents weigh by their length), or,
    with ``per_document``, a document is drawn first, each equally likely, as
    the official tf.data pipeline (one crop per document per epoch) does.
    """

    def __init__(
        self, split: Split, context_len: int, num_latents: int, seed: int, per_document: bool = False
    ):
        lengths = split.lengths.astype(np.int64)
        if len(lengths) == 0:
            raise ValueError("cannot sample crops from a split with no documents")
        self.context_len = context_len
        self.seed = seed
        self.per_document = per_document
        # Fewer than 2 events has nothing to predict.
        self.min_len = np.minimum(num_latents + 1, lengths)
        self.num_ends = np.where(lengths >= 2, lengths - np.maximum(self.min_len, 2) + 1, 0)
        self.cum_ends = np.cumsum(self.num_ends)
        if self.cum_ends[-1] == 0:
            raise ValueError("every document is shorter than 2 tokens: nothing to train on")

    def crops(self, step: int, count: int) -> np.ndarray:
        """The ``count`` crops of global batch ``step`` ([count, 3]), the same on every rank."""
        rng = np.random.default_rng([self.seed, step])
        if self.per_document:
            docs = np.flatnonzero(self.num_ends > 0)
            doc = docs[rng.integers(0, len(docs), size=count)]
            offset = rng.integers(0, self.num_ends[doc])
        else:
            u = rng.integers(0, self.cum_ends[-1], size=count)
            doc = np.searchsorted(self.cum_ends, u, side="right")
            offset = u - (self.cum_ends[doc] - self.num_ends[doc])
        end = np.maximum(self.min_len[doc], 2) + offset
        start = np.maximum(end - (self.context_len + 1), 0)
        return np.stack([doc, start, end], axis=1)


class StreamWindows:
    """Fixed windows of N + 1 events over the split's documents laid end to end.

    Window i covers tokens [i N, i N + N + 1): consecutive windows share one
    token so every token is a target once per epoch. Each epoch visits the
    windows in a new seeded order. Positions count from 1 within the window.
    Fastest steps (no padding), but contexts cross document boundaries. The
    order of the current epoch is kept (8 bytes a window: 84 MB for 11 GB of
    bytes at N = 1024) rather than drawn again at every step.
    """

    def __init__(self, split: Split, context_len: int, seed: int):
        self.context_len = context_len
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}
        self.num_windows = max((split.num_tokens - 1) // context_len, 0)
        if self.num_windows == 0:
            raise ValueError(
                f"the split holds {split.num_tokens} tokens, fewer than one window of "
                f"{context_len + 1}: lower context_len or use random crops"
            )

    def crops(self, step: int, count: int) -> np.ndarray:
        first = step * count
        flat = np.arange(first, first + count)
        epoch, index = flat // self.num_windows, flat % self.num_windows
        out = np.empty((count, 3), dtype=np.int64)
        for e in np.unique(epoch):
            order = self._order(int(e))
            sel = epoch == e
            out[sel, 1] = order[index[sel]] * self.context_len
        out[:, 0] = -1
        out[:, 2] = out[:, 1] + self.context_len + 1
        return out

    def _order(self, epoch: int) -> np.ndarray:
        """The seeded order of the windows in ``epoch``; the last two epochs' are kept."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._orders[epoch]


def make_sampler(
    kind: str, split: Split, context_len: int, num_latents: int, seed: int
) -> RandomCrops | StreamWindows:
    """``"crops"`` (random crops, every valid crop end equally likely), ``"document-crops"``
    (every document equally likely, then a random end: the official weighting) or
    ``"stream"`` (fixed windows)."""
    if kind in ("crops", "document-crops"):
        return RandomCrops(split, context_len, num_latents, seed, per_document=kind == "document-crops")
    if kind == "stream":
        return StreamWindows(split, context_len, seed)
    raise ValueError(f"unknown sampler {kind!r}: choose 'crops', 'document-crops' or 'stream'")
