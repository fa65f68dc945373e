"""Evaluation protocols: coverage, context, exactness against brute force, baselines."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perceiver_ar import PerceiverAR, PerceiverARConfig
from perceiver_ar.evaluate import eval_windows, evaluate, evaluate_store, unigram_log2p
from perceiver_ar.store import StoreWriter, TokenStore


def random_docs(lengths, seed=0, vocab=259):
    rng = np.random.default_rng(seed)
    return [np.concatenate([[2], rng.integers(3, vocab, n - 2), [1]]) for n in lengths]


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = PerceiverARConfig.from_preset("tiny", context_len=24, num_latents=8, final_layer_init_zeros=False)
    return PerceiverAR(cfg).eval()


@pytest.mark.parametrize("block", [1, 3, 8])
def test_windows_score_every_target_once_with_enough_context(block):
    N = 24
    lengths = np.array([2, 5, 24, 25, 61])
    windows = eval_windows(lengths, N, block)
    for doc, length in enumerate(lengths):
        scored = []
        for _, start, end, k in windows[windows[:, 0] == doc]:
            assert 1 <= k <= block and end - start <= N
            targets = list(range(end - k + 1, end + 1))
            # The first target of the block sees N - B + 1 inputs, or all before it.
            assert targets[0] - start >= min(N - block + 1, targets[0])
            scored += targets
        assert scored == list(range(1, length))


@torch.no_grad()
def brute_force_bits(model, docs, num_latents):
    """Each target scored alone: inputs = the N events before it, M latents, its prediction is the last."""
    N = model.config.context_len
    bits = []
    for doc in docs:
        for j in range(1, len(doc)):
            x = torch.as_tensor(doc[max(0, j - N) : j])[None]
            pos = torch.arange(max(0, j - N) + 1, j + 1)[None]
            logp = F.log_softmax(model(x, pos, num_latents=num_latents).logits[0, -1], -1)
            bits.append(-float(logp[doc[j]]) / math.log(2))
    return np.mean(bits)


def test_stride1_is_exact_and_block_of_one_equals_it(model):
    docs = random_docs([5, 30, 40])
    expected = brute_force_bits(model, docs, num_latents=8)
    stride1 = evaluate(model, docs, protocol="stride1", batch_size=7)
    assert stride1["num_tokens"] == 4 + 29 + 39
    assert stride1["bits_per_token"] == pytest.approx(expected, rel=1e-5)
    block1 = evaluate(model, docs, protocol="block", block_size=1)
    assert block1["bits_per_token"] == pytest.approx(expected, rel=1e-5)
    # Blocks of M see less context for early targets: a different (valid) number.
    block = evaluate(model, docs, protocol="block")
    assert block["num_tokens"] == stride1["num_tokens"] and block["block_size"] == 8
    assert block["bits_per_token"] != pytest.approx(expected, rel=1e-6)


@torch.no_grad()
def test_block_protocol_scores_what_a_forward_predicts(model):
    # One document no longer than N + 1: each block is the tail of one forward over the prefix.
    doc = random_docs([20])[0]
    result = evaluate(model, [doc], protocol="block", block_size=8)
    bits = []
    for last in (8, 16, 19):  # blocks 1..8, 9..16, 17..19
        k = 8 if last < 19 else 3
        logp = F.log_softmax(model(torch.as_tensor(doc[:last])[None], num_latents=8).logits[0, -k:], -1)
        bits += [-float(logp[i, doc[last - k + 1 + i]]) / math.log(2) for i in range(k)]
    assert result["bits_per_token"] == pytest.approx(np.mean(bits), rel=1e-5)


def test_num_latents_is_a_call_time_argument(model):
    docs = random_docs([30])
    four = evaluate(model, docs, num_latents=4)
    assert four["num_latents"] == 4 and four["block_size"] == 4
    with pytest.raises(ValueError, match="num_latents must be in"):
        evaluate(model, docs, num_latents=100)
    with pytest.raises(ValueError, match="block_size must be in"):
        evaluate(model, docs, num_latents=4, block_size=5)
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(model, docs, protocol="sliding")


def test_untrained_model_scores_log2_vocab_and_counts_bytes(tmp_path):
    # The logits layer starts at zero: a uniform prediction over V = 259 ids.
    model = PerceiverAR(PerceiverARConfig.from_preset("tiny"))
    writer = StoreWriter(tmp_path / "s", 259, {"modality": "text", "tokenizer": {"type": "bytes"}})
    for doc in random_docs([10, 12]):
        writer.add("train", doc)
    for doc in random_docs([30, 7], seed=1):
        writer.add("validation", doc)
    writer.close()
    result = evaluate_store(model, str(tmp_path / "s"))
    assert result["num_tokens"] == 29 + 6
    assert result["num_bytes"] == 28 + 5  # EOS carries no byte
    assert result["bits_per_token"] == pytest.approx(math.log2(259), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(math.log2(259) * 35 / 33, rel=1e-6)
    assert "unigram_bits_per_byte" in result


def test_unigram_baseline_by_hand(tmp_path):
    writer = StoreWriter(tmp_path / "s", 6, {"modality": "text"})
    writer.add("train", [2, 3, 3, 4, 1])  # targets 3, 3, 4, 1 (SOS is never a target)
    writer.add("train", [2, 3, 1])  # targets 3, 1
    store = TokenStore(writer.close())
    log2p = unigram_log2p(store.split("train"), 6)
    counts = np.array([0, 2, 0, 3, 1, 0])  # PAD EOS SOS 3 4 5
    assert np.allclose(log2p, np.log2((counts + 1) / (6 + 6)))


def test_copy_store_reports_bits_per_byte_and_old_stores_still_evaluate(model, tmp_path):
    """A copy store's tokenizer is the byte tokenizer; its older form, the string "bytes", still works."""
    import json

    from perceiver_ar.copy_task import write_copy_store
    from perceiver_ar.tokenizer import ByteTokenizer, tokenizer_from_dict

    store_dir = write_copy_store(tmp_path / "copy", length=16, num_train=2, num_validation=3)
    meta_path = store_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert isinstance(tokenizer_from_dict(meta["tokenizer"]), ByteTokenizer)
    result = evaluate_store(model, str(store_dir))
    # 3 sequences of SOS, 14 data bytes, EOS: 15 targets each, EOS counts no byte.
    assert result["num_tokens"] == 45 and result["num_bytes"] == 42
    assert result["bits_per_byte"] == pytest.approx(result["bits_per_token"] * 45 / 42)
    meta["tokenizer"] = "bytes"
    meta_path.write_text(json.dumps(meta))
    old = evaluate_store(model, str(store_dir))
    assert old["bits_per_byte"] == pytest.approx(result["bits_per_byte"])
    assert "bits_per_byte" not in evaluate(model, TokenStore(store_dir).split("validation"))
