"""The tokenized data store: memory-mapped token ids, documents kept separate.

A store is a directory:

    meta.json              format, tokenizer, vocab size, dtype, counts per split,
                           and any modality facts (image shape, sample rate, ...)
    <split>.tokens.bin     every document's token ids back to back (raw, dtype in meta)
    <split>.offsets.npy    int64 [num_docs + 1]: document i is tokens[off[i]:off[i+1]]

Each document is a full event sequence as the model sees it (for text: SOS,
data tokens offset by 3, EOS). Reading memory-maps the token file, so a corpus
larger than memory works; writing streams documents to disk one at a time
(a long document piece by piece). meta.json's ``format`` is the store's
marker: only a directory holding it (and nothing but store files) is ever
replaced, and only when asked to (``overwrite``, ``--overwrite``).
"""

from __future__ import annotations

import json
import os
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .files import check_output_path, is_empty_dir, publish_dir, remove_temp, temp_dir_beside

FORMAT = "perceiver-ar-store/1"
META_NAME = "meta.json"
# The files a store is made of: anything else in a directory means it is not (only) a store.
STORE_FILE = re.compile(r"(meta\.json|[\w.-]+\.tokens\.bin|[\w.-]+\.offsets\.npy)")


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a store written by this tool (its marker: meta.json's ``format``)."""
    try:
        meta = json.loads((Path(path) / META_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith("perceiver-ar-store/")


def check_store_output(
    out: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False
) -> Path:
    """Refuse an ``--out`` a store may not be written to; call it before any work.

    A new or empty directory is fine. An existing store is replaced only with
    ``overwrite`` and only when it holds nothing but store files. Anything
    else, a path that equals or contains an input or the working directory, or
    one inside an input folder, is refused with the fix named.
    """
    target = check_output_path(out, inputs)
    if not target.exists() or is_empty_dir(target):
        return target
    if not is_store(target):
        raise ValueError(
            f"--out {out} exists, is not empty and is not a data store (no {META_NAME} of "
            f"format {FORMAT}): choose another --out"
        )
    foreign = sorted(p.name for p in target.iterdir() if not STORE_FILE.fullmatch(p.name))
    if foreign:
        raise ValueError(
            f"--out {out} is a data store but also holds other files ({', '.join(foreign[:3])}): "
            "move them away or choose another --out"
        )
    if not overwrite:
        raise ValueError(f"--out {out} already holds a data store: pass --overwrite to replace it")
    return target


class StoreWriter:
    """Stream documents into a new store; ``close()`` writes offsets and meta.json and publishes it.

    ``out_dir`` is checked by ``check_store_output`` (``inputs``, ``overwrite``).
    Files are written into a uniquely named temporary sibling that is renamed
    into place at the end, so an interrupted run never leaves a store that
    looks complete and never touches an existing one. Use it as a context
    manager (or call ``abort()``) so an error removes the temporary folder.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        vocab_size: int,
        meta: dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
        inputs: Sequence[str | os.PathLike] = (),
    ):
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.inputs = list(inputs)
        check_store_output(self.out_dir, self.inputs, overwrite)
        self.tmp_dir: Path | None = temp_dir_beside(self.out_dir)
        self.vocab_size = int(vocab_size)
        self.dtype = _dtype_for(self.vocab_size)
        self.meta = dict(meta or {})
        self._files: dict[str, Any] = {}
        # array("q"): 8 bytes a document (a corpus may hold millions), not a Python int's 36.
        self._offsets: dict[str, array] = {}

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, split: str, tokens: np.ndarray | list[int]) -> None:
        """Append one document (its full event sequence) to ``split``."""
        self.add_stream(split, [np.asarray(tokens)])

    def add_stream(self, split: str, pieces: Iterable[np.ndarray]) -> int:
        """Append one document given as consecutive pieces (a long file, tokenized chunk by chunk).

        Only one piece is in memory at a time. Returns the document's length.
        """
        if self.tmp_dir is None:
            raise ValueError("this StoreWriter is closed")
        if split not in self._files:
            self._files[split] = open(self.tmp_dir / f"{split}.tokens.bin", "wb")  # noqa: SIM115
            self._offsets[split] = array("q", [0])
        f, n = self._files[split], 0
        for piece in pieces:
            arr = np.asarray(piece)
            if arr.ndim != 1:
                raise ValueError("a document must be a 1-D sequence of token ids")
            if arr.size == 0:
                continue
            low = 0 if arr.dtype.kind == "u" else arr.min()  # unsigned ids cannot be negative
            if low < 0 or arr.max() >= self.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.vocab_size}), got {arr.min()}..{arr.max()}"
                )
            f.write(np.ascontiguousarray(arr, dtype=self.dtype).data)  # a copy only if needed
            n += arr.size
        if n == 0:
            raise ValueError("a document must be a non-empty 1-D sequence of token ids")
        self._offsets[split].append(self._offsets[split][-1] + n)
        return n

    def abort(self) -> None:
        """Drop everything written so far (the temporary folder only)."""
        for f in self._files.values():
            f.close()
        self._files = {}
        remove_temp(self.tmp_dir)
        self.tmp_dir = None

    def close(self) -> Path:
        if self.tmp_dir is None:
            raise ValueError("this StoreWriter is closed")
        for f in self._files.values():
            f.close()
        if not self._offsets:
            self.abort()
            raise ValueError("no documents were written: the corpus is empty")
        splits = {}
        for split, offsets in self._offsets.items():
            np.save(self.tmp_dir / f"{split}.offsets.npy", np.asarray(offsets, dtype=np.int64))
            splits[split] = {"num_docs": len(offsets) - 1, "num_tokens": int(offsets[-1])}
        meta = {
            "format": FORMAT,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype.name,
            "splits": splits,
            **self.meta,
        }
        (self.tmp_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            # The output may have changed while we worked: check it again before replacing it.
            check_store_output(self.out_dir, self.inputs, self.overwrite)
            publish_dir(self.tmp_dir, self.out_dir)
        except BaseException:
            self.abort()
            raise
        self.tmp_dir = None
        return self.out_dir


class Split:
    """One split of a store: ``len(split)`` documents, ``split[i]`` a read-only view."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens = tokens
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


class TokenStore:
    """Read a store written by ``StoreWriter``: ``store.split("train")``, ``store.meta``."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        meta_path = self.dir / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.dir} is not a prepared data store (no {META_NAME}); "
                "create one with `perceiver-ar prepare`"
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self._splits: dict[str, Split] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def split_names(self) -> list[str]:
        return list(self.meta["splits"])

    def split(self, name: str) -> Split:
        if name not in self.meta["splits"]:
            raise ValueError(f"{self.dir} has no split {name!r}; it has {self.split_names}")
        if name not in self._splits:
            offsets = np.load(self.dir / f"{name}.offsets.npy", allow_pickle=False)
            path = self.dir / f"{name}.tokens.bin"
            n = int(offsets[-1])
            dtype = np.dtype(self.meta["dtype"])
            if path.stat().st_size != n * dtype.itemsize:
                raise ValueError(
                    f"{path} is truncated or corrupt: {path.stat().st_size} bytes for {n} tokens"
                )
            tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
            self._splits[name] = Split(tokens, offsets)
        return self._splits[name]
