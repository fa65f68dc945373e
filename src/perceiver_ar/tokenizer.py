"""Text tokenizers with the official id scheme: PAD 0, EOS 1, SOS 2, data from 3.

``ByteTokenizer`` (the default) maps UTF-8 byte b to id b + 3, so V = 259.
``BPETokenizer`` is a byte-level BPE trained with the ``tokenizers`` library;
its first three ids are the same special tokens. Both describe themselves as
a JSON-able dict (kept in the store's ``meta.json``) and come back from it
with ``tokenizer_from_dict``.

BPE tokenizers learnt here split text into words with ``SPLIT_PATTERN``, a
regular expression written so that Python's ``re`` and the ``tokenizers``
library (Oniguruma) read it the same way. That lets ``BPETokenizer`` encode
large corpora without the library's per-token overhead: words are found with
``re``, each distinct word is encoded once by the library's BPE model and
cached, and a document's ids are gathered with numpy (about 3x the library's
own ``encode`` on this project's CPU). The ids are the library's: tests
compare the two paths on text with every kind of character.
"""

from __future__ import annotations

import heapq
import json
import re
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from itertools import repeat
from typing import Any

import numpy as np

from .vocab import EOS_ID, PAD_ID, SOS_ID, TOKEN_OFFSET

SPECIAL_TOKENS = ["<pad>", "<eos>", "<sos>"]  # ids 0, 1, 2 in this order

# Word splitting of BPE tokenizers learnt by this project: GPT-2's rule
# (contractions, letter runs, digit runs, other symbols, each with one leading
# space; whitespace runs) with explicit character classes instead of \s, \p{L}
# and \p{N}, whose meaning differs between regex engines. Whitespace is the six
# ASCII ones; "letters" are ASCII letters and every non-ASCII character except
# the General Punctuation block (U+2000-U+206F: dashes, quotes, spaces), which
# counts as a symbol. Non-ASCII characters appear literally, ASCII controls as
# \xHH escapes: the only syntax both engines share.
_SPACE = "\\t\\n\\r\\x0b\\x0c"
_LETTER = "A-Za-z" + chr(0x80) + "-" + chr(0x1FFF) + chr(0x2070) + "-" + chr(0x10FFFF)
SPLIT_PATTERN = (
    f"'(?:[sdmt]|ll|ve|re)| ?[{_LETTER}]+| ?[0-9]+| ?[^ {_SPACE}{_LETTER}0-9]+"
    f"|[ {_SPACE}]+(?![^ {_SPACE}])|[ {_SPACE}]+"
)
# Texts longer than this are encoded in pieces; a cut comes at most
# _CUT_WINDOW before the nominal end of a piece (else the piece ends mid-word:
# BPE may then split that one word differently than the whole text would).
LONG_TEXT = 1 << 20
_CUT_WINDOW = 1 << 16
# Places SPLIT_PATTERN always splits at, whatever follows or precedes: before a
# space or after a newline, each between two characters that are not spaces.
_SAFE_CUT = re.compile(f"(?<=[^ {_SPACE}])(?= [^ {_SPACE}])|(?<=[^ {_SPACE}]\\n)(?=[^ {_SPACE}])")
_FIND_WORDS = re.compile(SPLIT_PATTERN).findall
# BPE merges are learnt from at most this many distinct words, the most frequent.
MAX_TRAINING_WORDS = 200_000
# The fast encoder keeps at most this many distinct words (then starts afresh):
# about 40 MB, a few hundred thousand words, enough for the common words of any language.
WORD_CACHE_SIZE = 250_000


def _byte_level_table() -> dict[int, str]:
    """The character byte-level BPE writes for each byte (GPT-2's table), as a ``str.translate`` table.

    Printable Latin-1 bytes stand for themselves; the 68 others (controls,
    space, soft hyphen) take the code points 256, 257, ... in byte order.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_table()


class ByteTokenizer:
    """UTF-8 bytes: byte b has id b + 3 (the official text vocabulary, V = 259)."""

    kind = "bytes"
    vocab_size = 256 + TOKEN_OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + TOKEN_OFFSET for b in text.encode("utf-8")]

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        """``encode`` as an array (int64 unless ``dtype`` says), without a Python int per byte."""
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
        ids += TOKEN_OFFSET
        return ids

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
    """Byte-level BPE from the ``tokenizers`` library; ids 0-2 are PAD, EOS, SOS.

    Text is always data: a document that contains the string "<eos>" gets
    the ids of those characters, never the special id.
    """

    kind = "bpe"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        for i, name in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(name) != i:
                raise ValueError(f"BPE tokenizer must give {name} the id {i}")
        self.vocab_size = tokenizer.get_vocab_size()
        tokenizer.encode_special_tokens = True
        # The fast path needs this project's word splitting and a plain BPE model
        # (tokenizers learnt before SPLIT_PATTERN existed use the library's encode).
        self._words = _FIND_WORDS if _splits_like_this_project(tokenizer) else None
        self._model = tokenizer.model
        self._clear_cache()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> BPETokenizer:
        """Learn a BPE from an iterator of texts (streamed: only the word counts are kept).

        The texts may be pieces of documents cut between words (as
        ``data.text_pieces`` cuts them): BPE never merges across words.
        """
        counts: Counter[str] = Counter()
        for text in texts:
            count_words(text, counts)
        return cls.from_word_counts(counts, vocab_size)

    @classmethod
    def from_word_counts(cls, counts: dict[str, int], vocab_size: int = 4096) -> BPETokenizer:
        """Learn a BPE from word counts (words as ``SPLIT_PATTERN`` finds them; see ``learn_merges``)."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"a byte-level BPE needs vocab_size >= 259, got {vocab_size}")
        vocab, merges = learn_merges(counts, vocab_size)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.add_special_tokens(SPECIAL_TOKENS)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        """The ids of ``text`` as an array (int64 unless ``dtype`` says); the fast path when it applies.

        A long text is encoded in pieces of about ``LONG_TEXT`` characters cut
        between words, so the word list never holds more than one piece.
        """
        if self._words is None:
            return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=dtype)
        if len(text) > LONG_TEXT:
            return np.concatenate([self.encode_array(p, dtype) for p in _pieces_between_words(text)])
        words = self._words(text)
        if not words:
            return np.zeros(0, dtype=dtype)
        index = self._word_index(words)
        flat = np.frombuffer(self._flat, dtype=np.int32)
        starts = np.frombuffer(self._starts, dtype=np.int64)[index]
        lengths = np.frombuffer(self._lengths, dtype=np.int64)[index]
        ends = np.cumsum(lengths)
        # Position k of the output reads flat[starts[w] + k - (ends[w] - lengths[w])] for its word w.
        gather = np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]))
        return flat[gather].astype(dtype)

    def _word_index(self, words: list[str]) -> np.ndarray:
        """Each word's entry in the cache, encoding the words not yet there."""
        index = np.fromiter(map(self._index.get, words, repeat(-1)), dtype=np.int64, count=len(words))
        missing = np.flatnonzero(index < 0)
        if missing.size:
            new = list(dict.fromkeys(words[i] for i in missing))
            if len(self._index) + len(new) > WORD_CACHE_SIZE:
                self._clear_cache()
                new = list(dict.fromkeys(words))
                missing = np.arange(len(words))
            for word in new:
                byte_chars = word.encode("utf-8").decode("latin-1").translate(_BYTE_LEVEL)
                ids = [t.id for t in self._model.tokenize(byte_chars)]
                self._index[word] = len(self._starts)
                self._starts.append(len(self._flat))
                self._lengths.append(len(ids))
                self._flat.extend(ids)
            get = self._index.__getitem__
            index[missing] = [get(words[i]) for i in missing]
        return index

    def _clear_cache(self) -> None:
        self._index: dict[str, int] = {}
        self._starts = array("q")
        self._lengths = array("q")
        self._flat = array("i")

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


def count_words(text: str, counts: Counter[str] | None = None) -> Counter[str]:
    """Add the words of ``text`` (as ``SPLIT_PATTERN`` finds them) to ``counts``; long texts go in pieces."""
    counts = Counter() if counts is None else counts
    for piece in _pieces_between_words(text):
        counts.update(_FIND_WORDS(piece))
    return counts


def learn_merges(
    counts: dict[str, int], vocab_size: int, max_words: int = MAX_TRAINING_WORDS
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE merges learnt from word counts: the vocabulary (token -> id) and the merges in order.

    Ids 0-2 are the special tokens, 3 + b the byte b (written as byte-level
    BPE writes it, ``_BYTE_LEVEL``), then one id per merge in the order
    learnt. Each step merges the most frequent adjacent pair of tokens over
    all words, weighted by their counts (ties: the pair with the smaller ids),
    until ``vocab_size`` tokens or no pair is left; a merge whose result is
    already a token (reached by another split) reuses its id, as the
    ``tokenizers`` library's trainer does. Only the ``max_words`` most
    frequent words take part (ties by the word), which bounds memory and time
    and drops words too rare to matter.
    """
    chosen = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_words]
    token = [*SPECIAL_TOKENS, *(_BYTE_LEVEL[b] for b in range(256))]
    ids = {t: i for i, t in enumerate(token)}
    words = [[TOKEN_OFFSET + b for b in word.encode("utf-8")] for word, _ in chosen]
    weight = [c for _, c in chosen]
    pairs: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:], strict=False):
            pairs[pair] += weight[i]
            where[pair].add(i)
    heap = [(-c, a, b) for (a, b), c in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(token) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        count = pairs.get((a, b), 0)
        if count <= 0:
            continue
        if count != -neg:  # the count fell since this entry was pushed
            heapq.heappush(heap, (-count, a, b))
            continue
        text = token[a] + token[b]
        new = ids.get(text)
        if new is None:
            new = ids[text] = len(token)
            token.append(text)
        merges.append((token[a], token[b]))
        grown: set[tuple[int, int]] = set()
        for i in where.pop((a, b)):
            word, c = words[i], weight[i]
            merged, k = [], 0
            while k < len(word):
                if k + 1 < len(word) and word[k] == a and word[k + 1] == b:
                    merged.append(new)
                    k += 2
                else:
                    merged.append(word[k])
                    k += 1
            if len(merged) == len(word):
                continue  # an entry left from an earlier merge: the pair is gone from this word
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] -= c
            for pair in zip(merged, merged[1:], strict=False):
                pairs[pair] += c
                where[pair].add(i)
                if new in pair:
                    grown.add(pair)
            words[i] = merged
        pairs.pop((a, b), None)
        for pair in grown:
            heapq.heappush(heap, (-pairs[pair], *pair))
    return {t: i for i, t in enumerate(token)}, merges


def _pieces_between_words(text: str) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``LONG_TEXT`` characters, cut where words split."""
    start = 0
    while len(text) - start > LONG_TEXT:
        end = start + LONG_TEXT
        cut = end
        for m in _SAFE_CUT.finditer(text, end - _CUT_WINDOW, end + 2):
            if m.start() <= end:
                cut = m.start()
        yield text[start:cut]
        start = cut
    yield text[start:]


def _splits_like_this_project(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` splits words with ``SPLIT_PATTERN`` and maps bytes with nothing else on top.

    Then encoding a word with its BPE model alone gives the library's ids, and
    the fast path applies. A normalizer, another pre-tokenizer or BPE dropout
    (random merges) rules it out.
    """
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if spec.get("normalizer") is not None or len(steps) != 2:
        return False
    split, byte_level = steps
    model = spec.get("model") or {}
    return (
        split.get("type") == "Split"
        and split.get("pattern") == {"Regex": SPLIT_PATTERN}
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and byte_level.get("use_regex") is False
        and not byte_level.get("add_prefix_space")
        and model.get("type") == "BPE"
        and model.get("dropout") is None
        and not model.get("byte_fallback")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
    )


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
