"""Corpora at scale: record inputs, the parallel encoder, the fast BPE, stores read through the memory map.

- JSON Lines, zstd JSON Lines and Parquet round-trip to the same store as the
  equivalent text files (bytes and BPE), records with empty text skipped like
  empty files; mixed folders; bad records and missing packages are one clear error.
- The store is byte for byte the same for 1 and 2 workers (bytes and BPE, with
  many tasks, documents cut into pieces, and a BPE sample smaller than the corpus).
- The BPE sample is bounded by --bpe-sample-bytes and drawn from training documents only.
- The fast BPE encoder gives the ``tokenizers`` library's ids on text with every
  kind of character; long texts encoded in pieces give the ids of the whole; the
  merges learnt from word counts agree with the library's trainer.
- A store bigger than the process's allowed private memory (RLIMIT_DATA) is
  sampled for training and evaluated through the memory map.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from perceiver_ar import corpus
from perceiver_ar.cli import main as cli_main
from perceiver_ar.data import default_corpus_files, prepare_text, split_documents
from perceiver_ar.store import TokenStore
from perceiver_ar.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, BPETokenizer, count_words, learn_merges

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "fox", "naïve", "café", "日本語", "3.14", "!!", "don't", "it's", "\t", "  ", "\n", " ", "—"]


def make_texts(num_docs=9, seed=0):
    """Varied documents (one empty, which is no document), as a list in corpus order."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(num_docs):
        words = rng.choice(WORDS, size=40 + 60 * i)
        texts.append(f"Document {i}.\n" + " ".join(words) + "\n")
    texts[3] = ""
    return texts


def write_text_files(folder, texts):
    folder.mkdir(parents=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")


def write_records(path, texts, fmt, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        ids = list(range(len(texts)))
        pq.write_table(pa.table({"id": ids, field: texts}), path, row_group_size=4)
        return
    lines = "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)).encode()
    if fmt == "jsonl.zst":
        lines = zstandard.ZstdCompressor().compress(lines)
    path.write_bytes(lines)


def store_files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.name != "meta.json"}


def meta_core(path):
    """meta.json without what names the inputs (paths, record numbers, the text field)."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    return {k: v for k, v in meta.items() if k not in ("source", "documents", "text_field")}


# ----------------------------------------------------------------------------
# Record inputs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, tokenizer",
    [
        ("jsonl", "bytes"),
        ("jsonl.zst", "bytes"),
        ("parquet", "bytes"),
        ("jsonl.zst", "bpe"),
        ("parquet", "bpe"),
    ],
)
def test_records_make_the_store_the_text_files_make(tmp_path, fmt, tokenizer):
    texts = make_texts()
    write_text_files(tmp_path / "files", texts)
    write_records(tmp_path / "records" / f"corpus.{fmt}", texts, fmt)
    kw = dict(tokenizer=tokenizer, bpe_vocab_size=300, validation_fraction=0.3, chunk_bytes=256, workers=1)
    a = prepare_text([tmp_path / "files"], tmp_path / "a", **kw)
    b = prepare_text([tmp_path / "records" / f"corpus.{fmt}"], tmp_path / "b", **kw)
    assert store_files(a) == store_files(b)
    assert meta_core(a) == meta_core(b)
    meta = json.loads((b / "meta.json").read_text())
    assert meta["splits"]["train"]["num_docs"] + meta["splits"]["validation"]["num_docs"] == len(texts) - 1
    assert meta["text_field"] == "text"
    first = 0 if fmt == "parquet" else 1  # Parquet rows count from 0, JSON lines from 1
    names = meta["documents"]["train"] + meta["documents"]["validation"]
    assert sorted(int(n.rsplit(":", 1)[1]) for n in names) == [i + first for i in (0, 1, 2, 4, 5, 6, 7, 8)]


def test_a_folder_mixes_text_and_record_files_in_path_order(tmp_path):
    texts = make_texts(6)
    folder = tmp_path / "mixed"
    write_text_files(folder / "a", texts[:2])
    write_records(folder / "b.jsonl", texts[2:4], "jsonl", field="body")
    write_records(folder / "c.parquet", texts[4:], "parquet", field="body")
    write_text_files(tmp_path / "plain", texts)
    kw = dict(validation_fraction=0.3, workers=1)
    a = prepare_text([tmp_path / "plain"], tmp_path / "a", **kw)
    b = prepare_text([folder], tmp_path / "b", text_field="body", **kw)
    assert store_files(a) == store_files(b)
    names = json.loads((b / "meta.json").read_text())["documents"]
    expected = ["a/doc000.txt", "a/doc001.txt", "b.jsonl:1", "c.parquet:0", "c.parquet:1"]
    assert sorted(names["train"] + names["validation"]) == expected


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "fine"}\n{"text": "broken\n', r"bad\.jsonl, line 2: not a JSON record"),
        (
            b'{"text": "fine"}\n\n{"body": "x", "n": 1}\n',
            r"line 3: no field 'text' \(fields: body, n\): pass --text-field",
        ),
        (b'{"text": 7}\n', r"line 1: field 'text' is int, not a string"),
        (b'["text"]\n', r"line 1: a JSON list, not an object"),
        (b'{"text": "\xff"}\n', r"line 1: not a JSON record \(not UTF-8\)"),
    ],
)
def test_bad_json_lines_are_one_clear_error(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        prepare_text([tmp_path / "bad.jsonl"], tmp_path / "s", workers=1)
    assert not (tmp_path / "s").exists()


def test_bad_record_files_fail_before_any_work_with_the_fix(tmp_path, capsys):
    write_records(tmp_path / "p.parquet", ["a", None, "b"], "parquet")
    write_records(tmp_path / "other.parquet", ["a"], "parquet", field="body")
    (tmp_path / "broken.jsonl.zst").write_bytes(b"not zstd at all")
    (tmp_path / "empty.jsonl").write_bytes(b'{"text": ""}\n\n')
    cases = [
        ("p.parquet", r"row 1 of .*p\.parquet: the 'text' column is null"),
        (
            "other.parquet",
            r"other\.parquet has no column 'text' \(columns: id, body\): pass --text-field NAME",
        ),
        ("broken.jsonl.zst", r"broken\.jsonl\.zst is not valid zstd data"),
        ("empty.jsonl", r"the corpus is empty: no input file or record holds any text"),
    ]
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            prepare_text([tmp_path / name], tmp_path / "s", workers=2)
    # The CLI: one line, exit code 2, no traceback.
    code = cli_main(["prepare", "text", str(tmp_path / "other.parquet"), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "pass --text-field NAME" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_a_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    write_records(tmp_path / "c.parquet", ["a"], "parquet")
    write_records(tmp_path / "c.jsonl.zst", ["a"], "jsonl.zst")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "zstandard", None)
    for name, package in (("c.parquet", "pyarrow"), ("c.jsonl.zst", "zstandard")):
        message = f"needs the package '{package}': pip install 'perceiver-ar\\[corpora\\]'"
        with pytest.raises(ValueError, match=message):
            prepare_text([tmp_path / name], tmp_path / "s", workers=1)


def test_text_field_flag_reaches_prepare(tmp_path, capsys):
    write_records(tmp_path / "c.jsonl", make_texts(4), "jsonl", field="content")
    out = tmp_path / "s"
    args = ["prepare", "text", str(tmp_path / "c.jsonl"), "--text-field", "content", "--out", str(out)]
    assert cli_main([*args, "--workers", "2", "--validation-fraction", "0.4"]) == 0
    meta = TokenStore(out).meta
    assert meta["text_field"] == "content" and meta["splits"]["train"]["num_docs"] == 2
    assert "wrote" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# The parallel encoder
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_the_store_is_the_same_for_one_and_two_workers(tmp_path, tokenizer):
    texts = make_texts(12, seed=1)
    texts[5] = " ".join(texts) * 3  # one long document: many pieces, across tasks
    write_text_files(tmp_path / "c", texts[:6])
    write_records(tmp_path / "c" / "more.jsonl", texts[6:], "jsonl")
    kw = dict(tokenizer=tokenizer, bpe_vocab_size=400, validation_fraction=0.25, chunk_bytes=700)
    kw["bpe_sample_bytes"] = 5_000  # well under the training text (13 kB): the sample is drawn
    one = prepare_text([tmp_path / "c"], tmp_path / "one", workers=1, **kw)
    two = prepare_text([tmp_path / "c"], tmp_path / "two", workers=2, **kw)
    assert store_files(one) == store_files(two)
    assert (one / "meta.json").read_bytes() == (two / "meta.json").read_bytes()
    store = TokenStore(two)
    assert store.meta["splits"]["train"]["num_docs"] + store.meta["splits"]["validation"]["num_docs"] == 11
    if tokenizer == "bpe":  # the sample ends with the task that reaches the budget (tasks here < 4 kB)
        assert 5_000 <= store.meta["bpe_sample_bytes"] <= 9_000
        assert store.meta["bpe_sample_bytes"] < store.meta["num_bytes"]["train"]


def test_the_bpe_sample_holds_training_documents_only(tmp_path):
    # Validation documents are made of a word no training document has: it
    # must not become a token, while every training word does.
    train_word, val_word = "trainword", "heldoutword"
    is_val = split_documents(4, 0.25, seed=0)
    texts = [f"{val_word if v else train_word} " * 50 for v in is_val]
    write_text_files(tmp_path / "c", texts)
    kw = dict(tokenizer="bpe", bpe_vocab_size=400, validation_fraction=0.25, workers=2)
    meta = TokenStore(prepare_text([tmp_path / "c"], tmp_path / "s", **kw)).meta
    assert meta["documents"]["validation"] == [f"doc{int(np.flatnonzero(is_val)[0]):03d}.txt"]
    vocab = json.loads(meta["tokenizer"]["json"])["model"]["vocab"]
    assert f"Ġ{train_word}" in vocab and f"Ġ{val_word}" not in vocab
    assert meta["bpe_sample_bytes"] == meta["num_bytes"]["train"]  # small corpus: all of its training text


def test_ordered_map_keeps_order_and_bounds_what_is_in_flight():
    read = []

    def items():
        for i in range(40):
            read.append(i)
            yield i

    with corpus.worker_pool(2) as pool:
        results = corpus.ordered_map(pool, abs, items(), in_flight=3)
        for k, value in enumerate(results):
            assert value == k
            assert len(read) <= k + 3  # never more than 3 items read ahead of the consumer
    assert list(corpus.ordered_map(None, abs, range(-3, 0))) == [3, 2, 1]
    with pytest.raises(ValueError, match="at least 1"):
        with corpus.worker_pool(0):
            pass


def test_a_worker_that_dies_stops_the_work_with_one_line():
    with pytest.raises(ValueError, match="a worker process died .*fewer --workers"):
        with corpus.worker_pool(2) as pool:
            list(corpus.ordered_map(pool, os._exit, [3]))  # as a worker killed for memory would


def test_byte_sizes_on_the_command_line(tmp_path, capsys):
    from perceiver_ar.commands.prepare_text import byte_size

    assert [byte_size(x) for x in ("1000", "64M", "1.5G", "256MB", "2k")] == [
        1000,
        64 * 10**6,
        15 * 10**8,
        256 * 10**6,
        2000,
    ]
    write_text_files(tmp_path / "c", make_texts(5))
    for bad in ("lots", "-5M", "0"):
        out = str(tmp_path / "s")
        assert (
            cli_main(["prepare", "text", str(tmp_path / "c"), "--out", out, f"--bpe-sample-bytes={bad}"]) == 2
        )
        assert "--bpe-sample-bytes" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# The fast BPE encoder and the trainer
# ----------------------------------------------------------------------------

# Every class of SPLIT_PATTERN and its edges: ASCII and other whitespace, contractions, digits,
# symbols, non-ASCII letters, General Punctuation (U+2000-U+206F), emoji, combining marks.
TRICKY = list(" \t\n\r\x0b\x0c\x1c\x1d\x85\xa0\u2000\u2028\u3000'\"sdmtlvre-_.,!?0123456789aZ")
TRICKY += list("é東😀\u0301\u200b\u2070¼Ⅻ<>eos")
TRICKY += ["'s", "'ll", " 's", "<eos>", "<pad>", "don't", "\n\n", "  x"]


@pytest.fixture(scope="module")
def bpe():
    plays = [f.read_text(encoding="utf-8") for f in default_corpus_files()[:2]]
    return BPETokenizer.train(plays + ["".join(TRICKY) * 3], 1200)


def test_the_fast_encoder_gives_the_libraries_ids(bpe):
    assert bpe._words is not None  # the fast path is on for tokenizers learnt here
    rng = np.random.default_rng(0)
    for _ in range(1500):
        text = "".join(rng.choice(TRICKY, size=rng.integers(0, 40)))
        assert bpe.encode(text) == bpe.tokenizer.encode(text, add_special_tokens=False).ids, repr(text)
    play = default_corpus_files()[3].read_text(encoding="utf-8")
    assert bpe.encode(play) == bpe.tokenizer.encode(play, add_special_tokens=False).ids
    assert bpe.decode(bpe.encode(play)) == play
    assert not {0, 1, 2} & set(bpe.encode("<pad><eos><sos>"))  # text is never a special token


def test_the_fast_encoder_survives_its_cache_filling_up(bpe, monkeypatch):
    play = default_corpus_files()[4].read_text(encoding="utf-8")
    pieces = [play[i : i + 2000] for i in range(0, 40000, 2000)]
    expected = [bpe.encode(p) for p in pieces]
    monkeypatch.setattr("perceiver_ar.tokenizer.WORD_CACHE_SIZE", 50)
    small = BPETokenizer(bpe.tokenizer)
    assert [small.encode(p) for p in pieces] == expected
    assert len(small._index) <= max(50, max(len(set(small._words(p))) for p in pieces))


def test_long_texts_are_encoded_in_pieces_with_the_ids_of_the_whole(bpe, monkeypatch):
    text = "".join(np.random.default_rng(1).choice(TRICKY, size=30000))
    whole = bpe.encode(text)
    monkeypatch.setattr("perceiver_ar.tokenizer.LONG_TEXT", 1000)
    monkeypatch.setattr("perceiver_ar.tokenizer._CUT_WINDOW", 200)
    from perceiver_ar.tokenizer import _pieces_between_words

    pieces = list(_pieces_between_words(text))
    assert len(pieces) >= 30 and "".join(pieces) == text
    assert bpe.encode_array(text, dtype=np.uint16).tolist() == whole
    assert count_words(text) == Counter(re.findall(SPLIT_PATTERN, text))


def test_the_merges_agree_with_the_library_trainer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    plays = [f.read_text(encoding="utf-8") for f in default_corpus_files()[:3]]
    counts = Counter()
    for play in plays:
        count_words(play, counts)
    vocab, merges = learn_merges(counts, 1500)
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2] and len(vocab) == 1500
    assert all(a + b in vocab for a, b in merges)
    library = Tokenizer(models.BPE())
    library.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    library.train_from_iterator(plays, trainer=trainer)
    theirs = {tuple(m) for m in json.loads(library.to_str())["model"]["merges"]}
    # Ties between equally frequent pairs are broken by token ids, which differ.
    assert len(theirs & set(merges)) >= 0.98 * len(merges)


def test_tokenizers_learnt_before_the_split_pattern_still_encode():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    old = Tokenizer(models.BPE())
    old.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    old.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    old.train_from_iterator(["hello world, hello there"] * 5, trainer=trainer)
    tok = BPETokenizer(old)
    assert tok._words is None  # the library's own encode
    assert tok.encode("hello world") == old.encode("hello world", add_special_tokens=False).ids


# ----------------------------------------------------------------------------
# Stores larger than the memory a process may use
# ----------------------------------------------------------------------------

MEMMAP_CHILD = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, torch
    from perceiver_ar import PerceiverAR, PerceiverARConfig
    from perceiver_ar.samplers import RandomCrops, StreamWindows, crops_to_batch
    from perceiver_ar.evaluate import evaluate_store
    from perceiver_ar.store import TokenStore

    torch.set_num_threads(1)
    store_dir, headroom = sys.argv[1], int(sys.argv[2])
    model = PerceiverAR(PerceiverARConfig(context_len=64, num_latents=16, input_dim=16, latent_dim=16,
                                          num_latent_layers=1, cross_attend_heads=1, latent_heads=1))
    data = int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (data + headroom, resource.RLIM_INFINITY))
    store = TokenStore(store_dir)
    train = store.split("train")
    assert train.tokens.nbytes > 1.5 * headroom
    try:  # the limit is real: a copy of the split does not fit
        np.array(train.tokens)
        sys.exit("a copy of the split fitted: the limit does not constrain")
    except MemoryError:
        pass
    for sampler in (RandomCrops(train, 64, 16, seed=0), StreamWindows(train, 64, seed=0)):
        for step in range(50):
            events, positions = crops_to_batch(train, store.meta, sampler.crops(step, 8), 64)
            assert events.shape == (8, 65)
    result = evaluate_store(model, store_dir, max_tokens=300, batch_size=4)  # the baseline reads all of train
    assert result["num_tokens"] >= 300 and np.isfinite(result["unigram_bits_per_token"])
    print("ok", train.tokens.nbytes, flush=True)
    """
)


def test_a_store_larger_than_the_private_memory_allowed_is_trained_on_and_evaluated(tmp_path):
    """RLIMIT_DATA bounds the process's own (anonymous, private) memory; a read-only memory map is not
    charged to it, so the sampler and the evaluation work on a store 1.5x the limit only if they read
    through the map (a copy of the store fails, checked first). The file's pages are page cache."""
    from perceiver_ar.store import StoreWriter

    headroom = 96 << 20
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "big", 259, {"modality": "text", "tokenizer": {"type": "bytes"}}) as w:
        doc = rng.integers(3, 259, size=4 << 20, dtype=np.uint16)
        for _ in range(20):  # 20 documents of 4 Mi tokens: a 160 MiB train split
            w.add_stream("train", [np.array([2], np.uint16), doc, np.array([1], np.uint16)])
        w.add("validation", np.concatenate([[2], doc[:5000], [1]]))
        w.close()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [sys.executable, "-c", MEMMAP_CHILD, str(tmp_path / "big"), str(headroom)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-500:]
    assert proc.stdout.startswith("ok")
