"""Text preparation, the default corpus, positions and the batch samplers."""

import numpy as np
import pytest
import torch

from perceiver_ar import PerceiverAR, PerceiverARConfig, perceiver_ar_loss, shift_events
from perceiver_ar.data import default_corpus_files, prepare_text
from perceiver_ar.samplers import (
    RandomCrops,
    StreamWindows,
    crops_to_batch,
    positions_for_crop,
    targets_per_row,
)
from perceiver_ar.store import TokenStore
from perceiver_ar.tokenizer import ByteTokenizer

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box".split()


def make_corpus(folder, num_docs=6, base_len=150, seed=0):
    """Write num_docs small text files (varied lengths, one in a subfolder); returns their texts."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(num_docs):
        words = rng.choice(WORDS, size=base_len // 5 + 10 * i)
        text = f"Document {i}.\n" + " ".join(words) + "\n"
        path = folder / ("sub" if i % 2 else "") / f"doc{i}.txt"
        path.write_text(text, encoding="utf-8")
        texts[path.name] = text
    return texts


@pytest.fixture
def text_store(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    return TokenStore(prepare_text([tmp_path / "corpus"], tmp_path / "store", validation_fraction=0.3)), texts


def test_prepare_keeps_documents_whole_and_splits_by_document(text_store):
    store, texts = text_store
    tok = ByteTokenizer()
    meta = store.meta
    assert meta["modality"] == "text" and meta["tokenizer"]["type"] == "bytes"
    assert meta["splits"]["train"]["num_docs"] == 4 and meta["splits"]["validation"]["num_docs"] == 2
    names = meta["documents"]["train"] + meta["documents"]["validation"]
    assert sorted(n.split("/")[-1] for n in names) == sorted(texts)
    for split in ("train", "validation"):
        for name, doc in zip(meta["documents"][split], store.split(split), strict=True):
            assert doc[0] == 2 and doc[-1] == 1  # SOS ... EOS, one document each
            assert tok.decode(doc) == texts[name.split("/")[-1]]
        expected = sum(len(texts[n.split("/")[-1]].encode()) for n in meta["documents"][split])
        assert meta["num_bytes"][split] == expected


def test_globs_and_repeated_paths(tmp_path):
    make_corpus(tmp_path / "c")
    store = TokenStore(
        prepare_text(
            [str(tmp_path / "c" / "*.txt"), tmp_path / "c" / "doc0.txt"],
            tmp_path / "s",
            validation_fraction=0,
        )
    )
    assert store.split_names == ["train"]
    assert store.meta["splits"]["train"]["num_docs"] == 3  # doc0, doc2, doc4; doc0 once


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        prepare_text([tmp_path / "nowhere.txt"], tmp_path / "s")
    with pytest.raises(FileNotFoundError, match=r"\*\.nothing"):
        prepare_text([str(tmp_path / "*.nothing")], tmp_path / "s")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8.*offset 3"):
        prepare_text([bad], tmp_path / "s")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        prepare_text([empty], tmp_path / "s")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="holds no text files"):
        prepare_text([tmp_path / "nothing"], tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_default_corpus_is_the_38_plays(tmp_path):
    files = default_corpus_files()
    assert len(files) == 38
    assert {f.parent.name for f in files} >= {"tragedies", "comedies", "histories"}
    assert files[0].read_text(encoding="utf-8").startswith("# ")


def test_prepare_the_default_corpus(tmp_path):
    store = TokenStore(prepare_text(None, tmp_path / "shakespeare"))
    assert store.meta["splits"]["train"]["num_docs"] == 34
    assert store.meta["splits"]["validation"]["num_docs"] == 4
    assert store.meta["num_bytes"]["train"] > 4_000_000
    first = ByteTokenizer().decode(store.split("validation")[0][:40])
    assert first.startswith("# ") and "\n" in first


def test_positions_are_one_based_document_indices():
    assert positions_for_crop({"modality": "text"}, 40, 3).tolist() == [41, 42, 43]
    assert positions_for_crop({}, 0, 2).tolist() == [1, 2]


def test_random_crops_respect_minimum_length_and_documents(text_store):
    store, _ = text_store
    split = store.split("train")
    N, M = 64, 16
    sampler = RandomCrops(split, context_len=N, num_latents=M, seed=3)
    crops = np.concatenate([sampler.crops(step, 64) for step in range(20)])
    doc, start, end = crops.T
    lengths = split.lengths[doc]
    assert (start >= 0).all() and (end <= lengths).all()
    assert (end - start <= N + 1).all()
    assert (end - start >= np.minimum(M + 1, lengths)).all()
    assert ((start == 0) | (end - start == N + 1)).all()  # short only where the document starts
    assert (start == 0).any() and (end == lengths).any()  # both document edges are reached
    # Same (seed, step): same crops; another step: others.
    assert np.array_equal(sampler.crops(5, 8), RandomCrops(split, N, M, seed=3).crops(5, 8))
    assert not np.array_equal(sampler.crops(5, 8), sampler.crops(6, 8))

    events, positions = crops_to_batch(split, store.meta, crops[:32], N)
    assert events.shape == (32, N + 1) and positions.shape == (32, N)
    for row, (d, s, e) in enumerate(crops[:32]):
        n = e - s
        assert np.array_equal(events[row, :n], split[d][s:e])  # never crosses a document
        assert (events[row, n:] == 0).all()  # right-padded
        assert np.array_equal(positions[row, : n - 1], np.arange(s + 1, s + n))
        assert (positions[row, n - 1 :] == 0).all()


def test_crop_weighting_by_length_or_by_document(text_store):
    store, _ = text_store
    split = store.split("train")
    lengths = split.lengths
    by_length = np.concatenate([RandomCrops(split, 32, 8, seed=0).crops(s, 500)[:, 0] for s in range(8)])
    by_doc = np.concatenate(
        [RandomCrops(split, 32, 8, seed=0, per_document=True).crops(s, 500)[:, 0] for s in range(8)]
    )
    share_length = np.bincount(by_length, minlength=len(lengths)) / by_length.size
    share_doc = np.bincount(by_doc, minlength=len(lengths)) / by_doc.size
    expected = (lengths - 8) / (lengths - 8).sum()  # valid ends per document
    assert np.abs(share_length - expected).max() < 0.03
    assert np.abs(share_doc - 1 / len(lengths)).max() < 0.03
    assert np.abs(expected - 1 / len(lengths)).max() > 0.06  # the two weightings do differ here
    crops = RandomCrops(split, 32, 8, seed=0, per_document=True).crops(0, 200)
    assert (crops[:, 2] <= lengths[crops[:, 0]]).all() and (crops[:, 2] - crops[:, 1] >= 9).all()


def test_short_documents_give_whole_document_crops(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("ab")  # 4 events: SOS a b EOS
    store = TokenStore(prepare_text([tmp_path / "c"], tmp_path / "s", validation_fraction=0))
    crops = RandomCrops(store.split("train"), context_len=32, num_latents=8, seed=0).crops(0, 10)
    assert (crops[:, 1] == 0).all() and (crops[:, 2] == 4).all()


def test_targets_per_row_is_what_the_loss_counts(text_store):
    store, _ = text_store
    split = store.split("train")
    cfg = PerceiverARConfig.from_preset("tiny", context_len=48, num_latents=12)
    model = PerceiverAR(cfg)
    crops = RandomCrops(split, 48, 12, seed=0).crops(0, 24)
    crops[:4, 2] = crops[:4, 1] + np.array([2, 3, 7, 13])  # some rows shorter than M + 1
    events, positions = crops_to_batch(split, store.meta, crops, 48)
    inputs, targets = shift_events(torch.from_numpy(events))
    out = model(inputs, torch.from_numpy(positions))
    loss = perceiver_ar_loss(out.logits, targets, out.latent_index)
    assert int(loss.num_tokens) == int(targets_per_row(crops, 12).sum())
    assert targets_per_row(crops[:4], 12).tolist() == [1, 2, 6, 12]


def test_inputs_and_targets_match_the_official_shift(golden_dir):
    golden = np.load(golden_dir / "golden_A_rotary.npz")
    for case in ("full", "padded", "short", "edge"):
        inputs, targets = shift_events(torch.from_numpy(golden[f"{case}/events"].astype(np.int64)))
        assert np.array_equal(inputs.numpy(), golden[f"{case}/inputs"])
        assert np.array_equal(targets.numpy(), golden[f"{case}/targets"])


def test_stream_windows_cover_every_target_once_per_epoch(text_store):
    store, _ = text_store
    split = store.split("train")
    N = 32
    sampler = StreamWindows(split, context_len=N, seed=1)
    W = sampler.num_windows
    crops = np.concatenate([sampler.crops(step, 3) for step in range(W)])[:W]  # one epoch
    assert (crops[:, 0] == -1).all() and (crops[:, 2] - crops[:, 1] == N + 1).all()
    covered = np.zeros(split.num_tokens, dtype=int)
    for _, s, e in crops:
        covered[s + 1 : e] += 1  # targets of the window
    assert (covered[1 : W * N + 1] == 1).all()
    events, positions = crops_to_batch(split, store.meta, crops[:2], N)
    assert np.array_equal(events[0], split.tokens[crops[0, 1] : crops[0, 2]])
    assert np.array_equal(positions[0], np.arange(1, N + 1))
    with pytest.raises(ValueError, match="fewer than one window"):
        StreamWindows(split, context_len=10**6, seed=0)
