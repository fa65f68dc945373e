"""Modalities beyond text: images, symbolic music and raw audio.

Each module turns its own file format into documents of token ids with the
official scheme (PAD 0, EOS 1, SOS 2, data from 3), writes them into a data
store (``perceiver_ar.store``) with ``meta["modality"]`` set, and turns
generated ids back into files people can look at or listen to:

- ``images``: raster order, subpixels interleaved per pixel, 256 levels.
- ``music``: MIDI <-> the Music Transformer event vocabulary.
- ``audio``: 8-bit mu-law samples.

This file holds what they share: the skip-or-stop policy for bad input files
and the deterministic split of named items into train/valid/test.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

ON_ERROR_CHOICES = ("stop", "skip")
SPLITS = ("train", "validation", "test")


class BadInputFile(ValueError):
    """An input file that cannot be read; the message names the file."""


def describe(error: BaseException) -> str:
    """``TypeName: message`` of an exception, without a dangling colon when it has no message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def handle_bad_file(path: object, reason: str, on_error: str) -> None:
    """Stop with a clear error naming ``path``, or warn and let the caller skip it."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    if on_error == "stop":
        raise BadInputFile(f"{path}: {reason} (pass --on-error skip to leave such files out)")
    print(f"skipping {path}: {reason}", file=sys.stderr)


def split_keys(files: list) -> dict:
    """A name per file for ``assign_splits``: its path relative to the files' common folder.

    Relative names keep a corpus's split when its folder moves.
    """
    import os

    if not files:
        return {}
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    return {f: os.path.relpath(os.path.abspath(f), root) for f in files}


def assign_splits(names: list[str], validation_fraction: float, test_fraction: float) -> dict[str, str]:
    """Split named items into train/valid/test, stable across runs and machines.

    Items are ranked by a hash of their name; the first share goes to test,
    the next to valid. With three or more items every asked-for split gets at
    least one, and train always keeps at least one.
    """
    if validation_fraction < 0 or test_fraction < 0 or validation_fraction + test_fraction >= 1:
        raise ValueError("valid and test fractions must be >= 0 and sum to less than 1")
    ranked = sorted(names, key=lambda n: hashlib.sha1(n.encode("utf-8")).hexdigest())
    n = len(ranked)
    n_test, n_validation = round(n * test_fraction), round(n * validation_fraction)
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_validation = max(n_validation, 1 if validation_fraction > 0 else 0)
    while n_test + n_validation >= n and n_test + n_validation > 0:
        if n_validation >= n_test and n_validation > 0:
            n_validation -= 1
        else:
            n_test -= 1
    splits = {}
    for i, name in enumerate(ranked):
        splits[name] = "test" if i < n_test else "validation" if i < n_test + n_validation else "train"
    return splits


def find_files(paths: list[str | os.PathLike], suffixes: tuple[str, ...], what: str) -> list[Path]:
    """Files named directly, plus those with one of ``suffixes`` under folders (recursively), sorted.

    A path that does not exist, or finding nothing at all, is an error naming ``what`` was sought.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in suffixes)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not found:
        raise ValueError(f"no {what} under {', '.join(map(str, paths))}")
    return found
