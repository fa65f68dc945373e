"""``perceiver-ar prepare MODALITY``: turn raw data into a token store.

Each modality is a module ``perceiver_ar.commands.prepare_<modality>`` that
defines ``register(prepare_subparsers)``; this command finds them all, so a
new modality is one new file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

from . import __path__ as commands_path


def modality_modules() -> list[str]:
    """The ``prepare_*`` modules, text first, then alphabetical."""
    names = sorted(m.name for m in pkgutil.iter_modules(commands_path) if m.name.startswith("prepare_"))
    return sorted(names, key=lambda n: n != "prepare_text")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="prepare a corpus into a tokenized data store (text, ...)",
        description="Tokenize raw data into a memory-mapped store (documents kept separate, "
        "train/validation split by document, meta.json). Pick the modality: "
        "`perceiver-ar prepare text --help`.",
    )
    modalities = p.add_subparsers(dest="modality", metavar="MODALITY", required=True)
    for name in modality_modules():
        importlib.import_module(f"perceiver_ar.commands.{name}").register(modalities)
