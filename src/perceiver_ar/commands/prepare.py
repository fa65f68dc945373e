"""``perceiver-ar prepare MODALITY``: turn raw data into a token store.

Each modality is a module ``perceiver_ar.commands.prepare_<modality>`` that
defines ``register(prepare_subparsers)``; a new modality is one new module
plus one line in ``MODALITIES``.
"""

from __future__ import annotations

import argparse

from . import prepare_audio, prepare_copy, prepare_image, prepare_music, prepare_text

# The modality modules, in the order --help lists them: text first, then alphabetical.
MODALITIES = [prepare_text, prepare_audio, prepare_copy, prepare_image, prepare_music]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="prepare a corpus into a tokenized data store (text, ...)",
        description="Tokenize raw data into a memory-mapped store (documents kept separate, "
        "train/validation split by document, meta.json). Pick the modality: "
        "`perceiver-ar prepare text --help`.",
    )
    modalities = p.add_subparsers(dest="modality", metavar="MODALITY", required=True)
    for modality in MODALITIES:
        modality.register(modalities)
