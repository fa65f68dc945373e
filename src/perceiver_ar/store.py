"""The tokenized data store: memory-mapped token ids, documents kept separate.

A store is a directory:

    meta.json              format, tokenizer, vocab size, dtype, counts per split,
                           and any modality facts (image shape, sample rate, ...)
    <split>.tokens.bin     every document's token ids back to back (raw, dtype in meta)
    <split>.offsets.npy    int64 [num_docs + 1]: document i is tokens[off[i]:off[i+1]]

Each document is a full event sequence as the model sees it (for text: SOS,
data tokens offset by 3, EOS). Reading memory-maps the token file, so a corpus
larger than memory works; writing streams documents to disk one at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "perceiver-ar-store/1"
META_NAME = "meta.json"


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


class StoreWriter:
    """Stream documents into a new store; ``close()`` writes offsets and meta.json.

    Files are written under ``<out>.tmp`` and renamed into place at the end,
    so an interrupted run never leaves a store that looks complete.
    """

    def __init__(self, out_dir: str | os.PathLike, vocab_size: int, meta: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.tmp_dir = self.out_dir.with_name(self.out_dir.name + ".tmp")
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        self.vocab_size = int(vocab_size)
        self.dtype = _dtype_for(self.vocab_size)
        self.meta = dict(meta or {})
        self._files: dict[str, Any] = {}
        self._offsets: dict[str, list[int]] = {}

    def add(self, split: str, tokens: np.ndarray | list[int]) -> None:
        """Append one document (its full event sequence) to ``split``."""
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("a document must be a non-empty 1-D sequence of token ids")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {arr.min()}..{arr.max()}")
        if split not in self._files:
            self._files[split] = open(self.tmp_dir / f"{split}.tokens.bin", "wb")  # noqa: SIM115
            self._offsets[split] = [0]
        self._files[split].write(arr.astype(self.dtype).tobytes())
        self._offsets[split].append(self._offsets[split][-1] + arr.size)

    def close(self) -> Path:
        for f in self._files.values():
            f.close()
        if not self._offsets:
            shutil.rmtree(self.tmp_dir)
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
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp_dir, self.out_dir)
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
