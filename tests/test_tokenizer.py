"""Tokenizers: official byte ids, BPE special ids, round trips, save/load through meta.json."""

import json

import numpy as np
import pytest

from perceiver_ar.data import prepare_text
from perceiver_ar.store import TokenStore
from perceiver_ar.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    encode_document,
    make_tokenizer,
    tokenizer_from_dict,
)

TEXTS = [
    "To be, or not to be, that is the question:\n",
    "Whether 'tis nobler in the mind to suffer\tthe slings and arrows",
    "naïve café, Ærø, 日本語, emoji 🎭 and  double  spaces\r\n",
    "",
]


def test_bytes_use_the_official_ids():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert tok.encode("A\x00\xff") == [65 + 3, 0 + 3, 0xC3 + 3, 0xBF + 3]  # U+00FF is two UTF-8 bytes
    doc = encode_document(tok, "hi")
    assert doc.tolist() == [2, ord("h") + 3, ord("i") + 3, 1]  # SOS ... EOS


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(encode_document(tok, text)) == text  # specials are skipped
    assert tok.byte_lengths()[ids].sum() == len(text.encode("utf-8"))


def test_bpe_round_trip_and_special_ids():
    corpus = [t * 20 for t in TEXTS if t]
    tok = BPETokenizer.train(iter(corpus), vocab_size=320)
    assert tok.vocab_size == 320
    assert [tok.tokenizer.token_to_id(s) for s in ("<pad>", "<eos>", "<sos>")] == [0, 1, 2]
    # Merges were learnt: a repeated line takes fewer tokens than bytes.
    assert len(tok.encode(corpus[0])) < len(corpus[0].encode("utf-8")) / 2
    # Through JSON, as meta.json keeps it; unseen characters still round-trip (byte level).
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    for text in [*TEXTS, "unseen: ∮ E⋅da = Q, ñ\n\n  x"]:
        ids = again.encode(text)
        assert ids == tok.encode(text)
        assert all(3 <= i < 320 for i in ids)
        assert again.decode(ids) == text
        assert again.byte_lengths()[ids].sum() == len(text.encode("utf-8"))


def test_store_meta_keeps_the_tokenizer(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(TEXTS[:3]):
        (folder / f"{i}.txt").write_text(text * 30, encoding="utf-8")
    store = TokenStore(prepare_text([folder], tmp_path / "store", tokenizer="bpe", bpe_vocab_size=300))
    tok = tokenizer_from_dict(store.meta["tokenizer"])
    assert store.vocab_size == tok.vocab_size == 300
    texts = sorted(tok.decode(doc) for s in store.split_names for doc in store.split(s))
    assert texts == sorted(t * 30 for t in TEXTS[:3])


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        tokenizer_from_dict({"type": "sentencepiece"})
    with pytest.raises(ValueError, match="choose 'bytes' or 'bpe'"):
        make_tokenizer("chars")
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        BPETokenizer.train(iter(["abc"]), vocab_size=100)
    assert isinstance(tokenizer_from_dict({"type": "bytes"}), ByteTokenizer)
    assert np.array_equal(ByteTokenizer().byte_lengths()[:3], [0, 0, 0])
