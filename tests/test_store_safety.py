"""Data stores never overwrite what the tool did not make; text is read and tokenized in bounded pieces."""

import os

import numpy as np
import pytest

from perceiver_ar.data import prepare_text, read_text_chunks, text_pieces
from perceiver_ar.files import TEMP_PREFIX
from perceiver_ar.store import StoreWriter, TokenStore, check_store_output
from perceiver_ar.tokenizer import BPETokenizer, ByteTokenizer
from tests.test_data import make_corpus


def snapshot(root):
    """Every path under ``root`` with its bytes (files) or None (folders)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture
def corpus(tmp_path):
    make_corpus(tmp_path / "corpus")
    return tmp_path / "corpus"


@pytest.mark.parametrize(
    "out, message",
    [
        (lambda t: t / "corpus", "contains the input"),
        (lambda t: t, "contains the input"),
        (lambda t: t / "corpus" / "sub" / "store", "inside the input folder"),
        (lambda t: t / "corpus" / "doc0.txt", "is a file"),
        (lambda t: t / "notes", "is not a data store"),
    ],
)
def test_prepare_refuses_outputs_it_does_not_own(tmp_path, corpus, out, message):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("my notes")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=message):
        prepare_text([corpus], out(tmp_path))
    assert snapshot(tmp_path) == before


def test_prepare_refuses_the_working_directory(tmp_path, corpus, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for out in (tmp_path / "work", tmp_path):
        with pytest.raises(ValueError, match="contains the current directory"):
            check_store_output(out, [])


def test_a_store_is_replaced_only_with_overwrite_and_only_when_it_is_only_a_store(tmp_path, corpus):
    first = prepare_text([corpus], tmp_path / "store", validation_fraction=0)
    (tmp_path / "store.tmp").write_text("a file of the user's that the old writer deleted")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="already holds a data store: pass --overwrite"):
        prepare_text([corpus], first, validation_fraction=0)
    assert snapshot(tmp_path) == before
    out = prepare_text([corpus], first, validation_fraction=0.3, overwrite=True)
    assert TokenStore(out).split_names == ["train", "validation"]
    assert (tmp_path / "store.tmp").read_text().startswith("a file of the user's")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]  # no temporary left
    (out / "README.txt").write_text("added by the user")
    with pytest.raises(ValueError, match=r"also holds other files \(README.txt\)"):
        prepare_text([corpus], out, overwrite=True)
    assert (out / "README.txt").exists() and TokenStore(out).split_names == ["train", "validation"]


def test_an_empty_directory_is_used_and_a_failed_write_leaves_nothing(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    assert TokenStore(prepare_text([corpus], tmp_path / "empty")).vocab_size == 259
    old = snapshot(tmp_path / "empty")
    with pytest.raises(ValueError, match="token ids must lie"):
        with StoreWriter(tmp_path / "empty", 10, overwrite=True) as writer:
            writer.add("train", np.arange(5))
            writer.add("train", np.arange(20))  # out of range: the writer aborts
    assert snapshot(tmp_path / "empty") == old  # the old store is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_text_pieces_join_to_the_file_and_tokenize_as_the_whole(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "fox", "naïve", "café", "日本語", "3.14", "!!", "don't", "\t", "  ", "\n", "\n\n", " "]
    text = "".join(rng.choice(words, size=4000)) + " end"
    path = tmp_path / "one-line.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(text_pieces(path, chunk_bytes=256))
    assert len(pieces) > 20 and "".join(pieces) == text
    tok = BPETokenizer.train([text], 300)
    assert np.concatenate([tok.encode_array(p) for p in pieces]).tolist() == tok.encode(text)
    byte_tok = ByteTokenizer()
    assert np.concatenate([byte_tok.encode_array(p) for p in pieces]).tolist() == byte_tok.encode(text)


def test_a_bad_byte_is_reported_at_its_offset_across_chunks(tmp_path):
    data = ("é" * 300).encode("utf-8")  # two bytes a character: chunks of 7 split characters
    path = tmp_path / "bad.txt"
    for at in (400, 401):  # between two characters, inside one
        bad = data[:at] + b"\xff" + data[at:]
        path.write_bytes(bad)
        with pytest.raises(UnicodeDecodeError) as whole:
            bad.decode("utf-8")
        with pytest.raises(ValueError, match=f"offset {whole.value.start}\\)"):
            list(read_text_chunks(path, chunk_bytes=7))
    path.write_bytes(data)
    assert "".join(read_text_chunks(path, chunk_bytes=7)) == "é" * 300


def test_a_long_single_line_file_is_prepared_in_pieces(tmp_path):
    text = " ".join(f"w{i}" for i in range(20000))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "line.txt").write_text(text)
    store = TokenStore(
        prepare_text([tmp_path / "c"], tmp_path / "s", validation_fraction=0, chunk_bytes=1000)
    )
    doc = store.split("train")[0]
    assert ByteTokenizer().decode(doc) == text and store.meta["num_bytes"]["train"] == len(text)
