"""Held-out evaluation: bits per token and per byte under a documented protocol.

Protocols (every target of every document is scored exactly once; the SOS
event is never a target, EOS is):

- ``block`` (the official evaluation): a document's targets are cut into
  consecutive blocks of B <= M tokens. Each block is scored by one forward
  whose inputs are the <= N events ending just before the block's last
  target, with the latents on the block: every target sees at least N - B + 1
  events of context (all of them near the document start).
- ``stride1`` (exact, slow): B = 1. Every target is the last latent of its own
  forward over the N events before it, i.e. full context for each token.
  Cost is one forward per token: for small sets.

Bits per byte divide the total bits by the UTF-8 bytes of the scored tokens
(EOS counts zero bytes). The unigram baseline scores the same targets with
the add-one-smoothed token frequencies of the train split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .model import PerceiverAR
from .provenance import check_store
from .samplers import check_batch, positions_for_crop
from .store import Split, TokenStore
from .tokenizer import tokenizer_from_dict
from .vocab import PAD_ID

PROTOCOLS = ("block", "stride1")


def token_byte_lengths(meta: dict[str, Any]) -> np.ndarray | None:
    """Bytes per token id ([V]) of a store's tokenizer, or None when its meta names none.

    Copy-task stores written before their tokenizer entry became the byte
    tokenizer's dict hold the bare string "bytes"; it means the same thing.
    """
    tokenizer = meta.get("tokenizer")
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str):
        tokenizer = {"type": tokenizer}
    return tokenizer_from_dict(tokenizer).byte_lengths()


def eval_windows(doc_lengths: np.ndarray, context_len: int, block_size: int) -> np.ndarray:
    """Every forward of the protocol as rows (doc, start, end, num_targets).

    The inputs are events [start, end) of the document; the forward scores the
    targets end - num_targets + 1 .. end, the last num_targets latents.
    """
    rows = []
    for doc, length in enumerate(doc_lengths):
        for first in range(1, int(length), block_size):  # first target index of the block
            last = min(first + block_size, int(length)) - 1  # last target index
            end = last  # inputs end just before the last target: events[start:last]
            start = max(0, end - context_len)
            rows.append((doc, start, end, last - first + 1))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


@torch.no_grad()
def evaluate(
    model: PerceiverAR,
    split: Split | Sequence[np.ndarray],
    protocol: str = "block",
    num_latents: int | None = None,
    block_size: int | None = None,
    meta: dict[str, Any] | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    byte_lengths: np.ndarray | None = None,
    baseline_log2p: np.ndarray | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every target of ``split`` under ``protocol``; returns bits per token/byte and counts.

    num_latents: latents per forward (default: the model's M). block_size: B
    for the block protocol (default and maximum: num_latents). max_tokens:
    stop after about this many targets (whole documents first, in order).
    byte_lengths [V]: bytes per token id, for bits per byte (default: from the
    tokenizer in ``meta``; without either there is no ``bits_per_byte``, so
    ``evaluate_store`` passes the store's meta). baseline_log2p [V]: log2 probabilities
    of a reference model (``unigram_log2p``) scored on the same targets.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: choose one of {PROTOCOLS}")
    cfg = model.config
    meta = meta or {"modality": "text"}
    M = cfg.num_latents if num_latents is None else int(num_latents)
    if not 1 <= M <= cfg.context_len:
        raise ValueError(f"num_latents must be in [1, context_len={cfg.context_len}], got {M}")
    B = 1 if protocol == "stride1" else (M if block_size is None else int(block_size))
    if not 1 <= B <= M:
        raise ValueError(f"block_size must be in [1, num_latents={M}], got {B}")
    if byte_lengths is None:
        byte_lengths = token_byte_lengths(meta)
    docs = split if isinstance(split, Split) else list(split)
    lengths = docs.lengths if isinstance(docs, Split) else np.array([len(d) for d in docs])
    if len(lengths) == 0 or int(np.sum(np.maximum(lengths - 1, 0))) == 0:
        raise ValueError("nothing to evaluate: the split has no document with a target")

    windows = eval_windows(lengths, cfg.context_len, B)
    if max_tokens is not None:
        keep = np.cumsum(windows[:, 3]) - windows[:, 3] < max_tokens
        windows = windows[keep]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_bits, num_tokens, num_bytes, baseline_bits = 0.0, 0, 0, 0.0
    start_time = time.perf_counter()
    batches = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"eval ({protocol})", unit="batch", leave=False)
    for b0 in batches:
        chunk = windows[b0 : b0 + batch_size]
        T = int((chunk[:, 2] - chunk[:, 1]).max())
        inputs = np.full((len(chunk), T), PAD_ID, dtype=np.int64)
        targets = np.full((len(chunk), M), -1, dtype=np.int64)  # -1: latent not scored
        positions = None
        for row, (doc, start, end, k) in enumerate(chunk):
            n = end - start
            events = np.asarray(docs[doc][start : end + 1], dtype=np.int64)
            inputs[row, :n] = events[:n]
            pos = positions_for_crop(meta, int(start), int(n))
            if positions is None:
                positions = np.zeros((len(chunk), T, *pos.shape[1:]), dtype=np.int64)
            positions[row, :n] = pos
            # The last k latents of this row predict the last k events.
            targets[row, M - k :] = events[n + 1 - k : n + 1]
        # Checked here on the host; the forward then neither reads values nor waits.
        full_rows = check_batch(inputs, positions, cfg)
        x = torch.from_numpy(inputs).to(device)
        pos_t = torch.from_numpy(positions).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x, pos_t, num_latents=M, full_rows=full_rows, validate=False)
        # Rows shorter than M hold fewer latents: right-align the labels to them.
        m = out.logits.shape[1]
        labels = torch.from_numpy(targets[:, M - m :]).to(device)
        logp = F.log_softmax(out.logits.float(), dim=-1)
        scored = labels >= 0
        nll = -logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        total_bits += float((nll * scored).sum()) / math.log(2)
        num_tokens += int(scored.sum())
        scored_ids = targets[targets >= 0]
        if byte_lengths is not None:
            num_bytes += int(byte_lengths[scored_ids].sum())
        if baseline_log2p is not None:
            baseline_bits -= float(baseline_log2p[scored_ids].sum())
    model.train(was_training)
    seconds = time.perf_counter() - start_time
    result = {
        "protocol": protocol,
        "num_latents": M,
        "block_size": B,
        "context_len": cfg.context_len,
        "num_tokens": num_tokens,
        "bits_per_token": total_bits / max(num_tokens, 1),
        "seconds": seconds,
        "tokens_per_second": num_tokens / max(seconds, 1e-9),
    }
    if byte_lengths is not None:
        result["num_bytes"] = num_bytes
        result["bits_per_byte"] = total_bits / max(num_bytes, 1)
    if baseline_log2p is not None:
        result["unigram_bits_per_token"] = baseline_bits / max(num_tokens, 1)
        if byte_lengths is not None:
            result["unigram_bits_per_byte"] = baseline_bits / max(num_bytes, 1)
    return result


def unigram_log2p(train: Split, vocab_size: int) -> np.ndarray:
    """log2 of the train split's add-one-smoothed target frequencies ([V]).

    Targets are every event but each document's first (SOS is never predicted).
    """
    counts = np.zeros(vocab_size, dtype=np.float64)
    chunk = 1 << 22  # count a memory-mapped split piece by piece (bincount copies each to int64: 32 MB)
    for start in range(0, train.num_tokens, chunk):
        counts += np.bincount(train.tokens[start : start + chunk], minlength=vocab_size)
    counts -= np.bincount(train.tokens[train.offsets[:-1][train.lengths > 0]], minlength=vocab_size)
    return np.log2((counts + 1.0) / (counts.sum() + vocab_size))


def evaluate_store(
    model: PerceiverAR,
    data_dir: str,
    split: str = "validation",
    baseline: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """``evaluate`` on a split of a store, plus the unigram baseline when it has a train split."""
    store = TokenStore(data_dir)
    # The store must hold the kind of data the model was trained on (its
    # provenance); a model without one is checked by vocabulary size.
    check_store(model.provenance, model.config.vocab_size, store.meta, str(data_dir))
    byte_lengths = token_byte_lengths(store.meta)
    log2p = None
    if baseline and "train" in store.split_names:
        log2p = unigram_log2p(store.split("train"), store.vocab_size)
    result = evaluate(
        model, store.split(split), meta=store.meta, byte_lengths=byte_lengths, baseline_log2p=log2p, **kwargs
    )
    result["split"] = split
    return result
