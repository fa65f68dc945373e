"""Text tokenizers with the official id scheme: PAD 0, EOS 1, SOS 2, data from 3.

``ByteTokenizer`` (the default) maps UTF-8 byte b to id b + 3, so V = 259.
``BPETokenizer`` is a byte-level BPE trained with the ``tokenizers`` library;
its first three ids are the same special tokens. Both describe themselves as
a JSON-able dict (kept in the store's ``meta.json``) and come back from it
with ``tokenizer_from_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .vocab import EOS_ID, PAD_ID, SOS_ID, TOKEN_OFFSET

SPECIAL_TOKENS = ["<pad>", "<eos>", "<sos>"]  # ids 0, 1, 2 in this order


class ByteTokenizer:
    """UTF-8 bytes: byte b has id b + 3 (the official text vocabulary, V = 259)."""

    kind = "bytes"
    vocab_size = 256 + TOKEN_OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + TOKEN_OFFSET for b in text.encode("utf-8")]

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int64 array, without a Python int per byte (long texts)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + TOKEN_OFFSET

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the data ids; special ids are skipped, broken UTF-8 becomes U+FFFD."""
        data = bytes(int(i) - TOKEN_OFFSET for i in ids if int(i) >= TOKEN_OFFSET)
        return data.decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for ([V]; 0 for PAD, EOS, SOS)."""
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[:TOKEN_OFFSET] = 0
        return lengths

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vocab_size": self.vocab_size}


class BPETokenizer:
    """Byte-level BPE from the ``tokenizers`` library; ids 0-2 are PAD, EOS, SOS."""

    kind = "bpe"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        for i, name in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(name) != i:
                raise ValueError(f"BPE tokenizer must give {name} the id {i}")
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> BPETokenizer:
        """Learn merges from an iterator of documents (streamed, never all in memory)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"a byte-level BPE needs vocab_size >= 259, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) >= TOKEN_OFFSET])

    def byte_lengths(self) -> np.ndarray:
        # Byte-level BPE spells every token in a 256-character alphabet, one
        # character per byte, so a token's length is its number of bytes.
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.tokenizer.get_vocab().items():
            if i >= TOKEN_OFFSET:
                lengths[i] = len(token)
        return lengths

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vocab_size": self.vocab_size, "json": self.tokenizer.to_str()}


Tokenizer = ByteTokenizer | BPETokenizer


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """The event sequence of one document: SOS, its tokens, EOS."""
    ids = tokenizer.encode_array(text)
    return np.concatenate([[SOS_ID], ids, [EOS_ID]]).astype(np.int64)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from ``to_dict()`` (as kept in a store's meta.json)."""
    kind = d.get("type")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(d["json"]))
    raise ValueError(f"unknown tokenizer type {kind!r}: expected 'bytes' or 'bpe'")


def make_tokenizer(kind: str, texts: Iterator[str] | None = None, vocab_size: int = 4096) -> Tokenizer:
    """``"bytes"`` or ``"bpe"`` (trained on ``texts``)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        if texts is None:
            raise ValueError("a BPE tokenizer needs texts to train on")
        return BPETokenizer.train(texts, vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}: choose 'bytes' or 'bpe'")


__all__ = [
    "EOS_ID",
    "PAD_ID",
    "SOS_ID",
    "BPETokenizer",
    "ByteTokenizer",
    "encode_document",
    "make_tokenizer",
    "tokenizer_from_dict",
]
