"""What the tool may do to files: it writes only outputs it owns, atomically and durably.

Every directory the tool writes (a data store, a training run, a model
directory, a render folder) is recognised by a marker it leaves there (a
store's ``meta.json`` format, a run's ``run.json``, ...). An existing output
is replaced only when its marker says the tool made it, a path that equals
or contains an input or the current directory is refused, and nothing outside
the output path is ever removed. New contents go into a uniquely named
temporary sibling (``.perceiver-ar-<name>-XXXXXXXX``, made by ``tempfile``,
so it can never be a user's file) and are renamed into place after every
file and the directory itself are fsynced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".perceiver-ar-"


def temp_dir_beside(path: Path, tag: str = "tmp") -> Path:
    """A new empty directory next to ``path`` whose name no other file can have."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}-{tag}-"))


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename, a new file) durable; a no-op where that is not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then each directory, deepest first."""
    dirs = []
    for root, _, names in os.walk(directory):
        dirs.append(root)
        for name in names:
            fsync_file(os.path.join(root, name))
    for d in reversed(dirs):
        fsync_dir(d)


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Write ``path`` through ``write(tmp_path)`` on a unique temporary sibling, fsynced, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text))


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def publish_dir(tmp: Path, final: Path) -> Path:
    """Rename the finished directory ``tmp`` to ``final`` after fsyncing it.

    An existing ``final`` (the caller has checked that the tool made it) is
    first renamed to a temporary sibling and removed only once ``tmp`` is in
    place, so at every moment ``final`` is either the old or the new output.
    """
    fsync_tree(tmp)
    old = None
    if final.is_dir() and any(final.iterdir()):
        old = temp_dir_beside(final, "old")
        os.replace(final, old)  # onto the empty directory mkdtemp made
    os.replace(tmp, final)  # a missing or empty ``final`` is replaced in one step
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)
    return final


def remove_temp(path: Path | None) -> None:
    """Remove a temporary directory this process made (never anything else)."""
    if path is not None and path.name.startswith(TEMP_PREFIX) and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_path(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    flag: str = "--out",
    scanned: bool = True,
) -> Path:
    """Refuse an output path that is a file, or that equals or contains an input or the working directory.

    With ``scanned`` (inputs are folders read whole, as prepare reads them),
    an output inside an input folder is refused too: its files would be read
    as input the next time. Returns the path, resolved.
    """
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a directory: choose another {flag}")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(f"{flag} {out} contains the current directory: choose another {flag}")
    for raw in inputs:
        source = Path(raw).resolve()
        if target == source or target in source.parents:
            raise ValueError(f"{flag} {out} contains the input {raw}: choose another {flag}")
        if scanned and source.is_dir() and source in target.parents:
            raise ValueError(
                f"{flag} {out} lies inside the input folder {raw} (it would be read as input next time): "
                f"choose another {flag}"
            )
    return target
