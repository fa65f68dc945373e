"""Generation: golden sampling, cache == recompute, sliding, sampling controls, CLI."""

import json

import numpy as np
import pytest
import torch

from perceiver_ar import from_official, generate, generate_stream
from perceiver_ar.generate import prefill, sample
from perceiver_ar.kv_cache import KVCache, KVSlots
from perceiver_ar.vocab import PAD_ID
from tests.conftest import GOLDEN_DIR, make_model

NON_MODEL_KEYS = ("param_seed", "z_loss", "label_smoothing")


def random_prompt(B, T, seed=0, vocab=259):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def golden_sampling_model():
    data = np.load(GOLDEN_DIR / "golden_sampling_A_rotary.npz")
    kwargs = {k: v for k, v in json.loads(str(data["config_json"])).items() if k not in NON_MODEL_KEYS}
    params = {k.removeprefix("params/"): data[k] for k in data.files if k.startswith("params/")}
    return from_official(params, kwargs).eval(), data


# ---------------------------------------------------------------------------- golden


def test_golden_cached_sampling_step_for_step():
    """Prime, cached steps and the reset at step 36 reproduce the official sampler."""
    model, data = golden_sampling_model()
    start = int(data["start_step"])
    prompt = torch.from_numpy(data["prompt_events"][:, :start]).long()
    steps = list(generate_stream(model, prompt, 20, temperature=0))
    assert [s.mode for s in steps] == list(data["cached/step_mode"])
    assert [s.num_latents for s in steps][15:18] == [16, 8, 9]  # full at 35, reset to 16/2 at 36
    ref_tokens = data["cached/events"][:, start : start + 20]
    for s in steps:
        diff = np.abs(s.logits.numpy() - data["cached/step_logits"][s.index]).max()
        assert diff < 1e-4, f"step {s.index} ({s.mode}): logits differ by {diff}"
        np.testing.assert_array_equal(s.tokens.numpy(), ref_tokens[:, s.index], err_msg=f"step {s.index}")
    out = generate(model, prompt, 20, temperature=0)
    np.testing.assert_array_equal(out.tokens.numpy(), ref_tokens)


def test_golden_uncached_full_buffer():
    """The official uncached sampler: every step a full forward with M=16 latents."""
    model, data = golden_sampling_model()
    start = int(data["start_step"])
    for tag, events in (("uncached", "uncached/events"), ("uncached_on_cached_tokens", "cached/events")):
        buffer = torch.from_numpy(data[events]).long()
        for s in range(20):
            i = start + s
            with torch.no_grad():
                logits = model(buffer[:, :i], num_latents=16).logits[:, -1]
            np.testing.assert_allclose(logits.numpy(), data[f"{tag}/step_logits"][s], atol=1e-4)


# ------------------------------------------------------------- cache == recompute

CONFIGS = [
    dict(),
    dict(input_dim=32, latent_dim=24, cross_attend_heads=4, latent_heads=3, num_latent_layers=3),
    dict(num_latent_layers=1, rotary_fraction=1.0, latent_widening=2),
]


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("prompt_len", [3, 20])
def test_cached_logits_equal_recompute(pe, config, prompt_len):
    """Until the window slides past N, the cache computes what a full forward computes.

    The recompute hosts as many latents as the cache holds (the cached latent
    at p attended to the cached latents), so the equality holds through resets.
    """
    overrides = dict(CONFIGS[config])
    fill = 6 if config == 2 else None  # a non-default reset fill too
    model = make_model(pe, seed=config, **overrides)
    N = model.config.context_len
    prompt = random_prompt(2, prompt_len, seed=config)
    n_new = N - prompt_len + 1  # the last step sees exactly N tokens
    kw = dict(temperature=0, reset_fill=fill)
    cached = list(generate_stream(model, prompt, n_new, **kw))
    recomputed = list(generate_stream(model, prompt, n_new, use_cache=False, **kw))
    assert "reset" in [s.mode for s in cached] and {s.mode for s in recomputed} == {"recompute"}
    assert [s.num_latents for s in cached] == [s.num_latents for s in recomputed]
    for a, b in zip(cached, recomputed, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0, msg=f"step {a.index} ({a.mode})")
        assert torch.equal(a.tokens, b.tokens)


def test_reset_schedule_and_fill():
    """The latent caches fill to M, then a reset keeps ``reset_fill`` latents (default M/2)."""
    model = make_model()
    M = model.config.num_latents
    cases = (
        (None, [*range(1, 9), 4, 5, 6, 7, 8, 4], (8, 13)),
        (M - 2, [*range(1, 9), 6, 7, 8, 6], (8, 11)),
    )
    for fill, latents, resets in cases:
        steps = list(
            generate_stream(model, random_prompt(1, 4), len(latents), temperature=0, reset_fill=fill)
        )
        assert [s.num_latents for s in steps] == latents
        modes = ["reset" if i in resets else "cached_step" for i in range(len(latents))]
        assert [s.mode for s in steps] == ["prime", *modes[1:]]


# --------------------------------------------------------------------- sliding


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_sliding_past_context_stays_finite(pe):
    model = make_model(pe)
    N = model.config.context_len
    prompt = random_prompt(2, 5)
    steps = list(generate_stream(model, prompt, 3 * N, temperature=1.0, seed=0))
    assert len(steps) == 3 * N
    for s in steps:
        assert torch.isfinite(s.logits).all(), f"step {s.index}"
        assert ((s.tokens > PAD_ID) & (s.tokens < model.config.vocab_size)).all()
    slid = [s for s in steps if 5 + s.index > N]
    if pe == "rotary":  # the ring cache keeps decoding one token at a time past N
        assert "cached_step" in {s.mode for s in slid} and "reset" in {s.mode for s in slid}
    else:  # positions run past the table: the window is renumbered and recomputed each step
        assert {s.mode for s in slid} == {"reset"}
        tokens = torch.cat([prompt, torch.stack([s.tokens for s in steps], 1)], 1)
        with torch.no_grad():  # the last step saw the last N tokens at positions 1..N
            window = tokens[:, -N - 1 : -1]
            ref = prefill(model, window, torch.arange(1, N + 1).expand(2, N), steps[-1].num_latents, None)
        torch.testing.assert_close(steps[-1].logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_prompt_longer_than_context(pe):
    """Only the last N prompt tokens are seen, at their own positions (absolute: renumbered from 1)."""
    model = make_model(pe)
    N = model.config.context_len
    prompt = random_prompt(2, N + 18)
    out = generate(model, prompt, 12, temperature=0)
    tail_positions = torch.arange(19, N + 19).expand(2, N) if pe == "rotary" else None
    ref = generate(model, prompt[:, -N:], 12, temperature=0, positions=tail_positions)
    assert torch.equal(out.tokens, ref.tokens)


@pytest.mark.parametrize("new", [2, 3])
def test_a_renumbered_window_fits_the_cache_of_a_short_generation(new):
    """An absolute model whose prompt fills its table resets on the second token (reset_fill latents).

    The caches are sized to the generation; they must hold that fill even when
    fewer tokens than it are asked for. Cached == recomputed.
    """
    model = make_model("absolute")
    N = model.config.context_len
    prompt = random_prompt(1, N)
    cached = list(generate_stream(model, prompt, new, temperature=0))
    assert [s.mode for s in cached][1:] == ["reset"] * (new - 1)
    recomputed = list(generate_stream(model, prompt, new, temperature=0, use_cache=False))
    for a, b in zip(cached, recomputed, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)


def test_positions_continue_from_the_prompt():
    """A prompt cropped mid-sequence keeps its positions; new tokens continue from the last."""
    model = make_model("absolute", position_table_sizes=(129,))
    prompt = random_prompt(1, 10)
    pos = torch.arange(41, 51)[None]
    steps = list(generate_stream(model, prompt, 3, temperature=0, positions=pos))
    tokens = torch.cat([prompt, torch.stack([s.tokens for s in steps[:2]], 1)], 1)
    with torch.no_grad():
        ref = model(tokens, torch.arange(41, 53)[None], num_latents=3).logits[:, -1]
    torch.testing.assert_close(steps[2].logits, ref, atol=1e-5, rtol=0)


def test_planned_positions_and_several_position_tables():
    """Positions given for every token to come: the only way with several tables (images)."""
    model = make_model()
    prompt = random_prompt(2, 5)
    ref = generate(model, prompt, 10, temperature=0).tokens
    planned = torch.arange(1, 16).expand(2, 15)
    assert torch.equal(generate(model, prompt, 10, temperature=0, positions=planned).tokens, ref)

    model = make_model("absolute", position_table_sizes=(9, 5))  # e.g. image rows, columns
    T, K = 6, 14
    grid = torch.stack([torch.arange(T + K) // 4 + 1, torch.arange(T + K) % 4 + 1], -1).expand(2, T + K, 2)
    kw = dict(temperature=0, positions=grid)
    cached = list(generate_stream(model, random_prompt(2, T), K, **kw))
    recomputed = list(generate_stream(model, random_prompt(2, T), K, use_cache=False, **kw))
    for a, b in zip(cached, recomputed, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="every token to come"):
        generate(model, random_prompt(2, T), K)
    with pytest.raises(ValueError, match="run past the model.s table"):
        generate(model, random_prompt(2, T), K, positions=grid * 2)


# -------------------------------------------------------------------- sampling


def test_same_seed_same_tokens():
    model = make_model()
    prompt = random_prompt(2, 6)
    a = generate(model, prompt, 30, seed=123).tokens
    b = generate(model, prompt, 30, seed=123).tokens
    c = generate(model, prompt, 30, seed=124).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # the rows of a batch draw independently


def test_temperature_zero_is_greedy():
    model = make_model()
    prompt = random_prompt(2, 6)
    steps = list(generate_stream(model, prompt, 20, temperature=0))
    for s in steps:
        masked = s.logits.clone()
        masked[:, PAD_ID] = float("-inf")
        assert torch.equal(s.tokens, masked.argmax(-1))
    greedy = torch.stack([s.tokens for s in steps], 1)
    assert torch.equal(generate(model, prompt, 20, top_k=1, seed=5).tokens, greedy)
    assert torch.equal(generate(model, prompt, 20, temperature=0, top_k=3, top_p=0.1).tokens, greedy)


def test_sample_never_emits_filtered_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 40, generator=g) * 3
    logits[0, PAD_ID] = 100.0  # PAD is never drawn, however likely
    for top_k in (1, 5):
        allowed = torch.topk(logits[:, 1:], top_k, dim=-1).indices + 1
        seen = set()
        for _ in range(200):
            ids = sample(logits, 1.5, top_k=top_k, generator=g)
            assert all(int(ids[b]) in allowed[b].tolist() for b in range(4))
            seen.add(tuple(ids.tolist()))
        assert len(seen) > (1 if top_k > 1 else 0)
    for top_p in (0.3, 0.9):
        no_pad = logits.clone()
        no_pad[:, PAD_ID] = float("-inf")
        probs = no_pad.softmax(-1).numpy()
        nuclei = []
        for row in probs:
            order = np.argsort(-row)
            k = int(np.searchsorted(np.cumsum(row[order]), top_p)) + 1
            nuclei.append(set(order[:k].tolist()))
        for _ in range(200):
            ids = sample(logits, 1.0, top_p=top_p, generator=g)
            assert all(int(ids[b]) in nuclei[b] for b in range(4)), (top_p, ids, nuclei)


def test_allowed_tokens_are_the_only_draws():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g) * 3
    allowed = [5, 9, 17, 30]
    logits[:, 2] = 100.0  # far the most likely, but not allowed
    seen = set()
    for _ in range(100):
        ids = sample(logits, 2.0, generator=g, allowed_tokens=allowed)
        assert set(ids.tolist()) <= set(allowed)
        seen.update(ids.tolist())
    assert len(seen) > 1
    best = torch.tensor([max(allowed, key=lambda i: float(logits[b, i])) for b in range(3)])
    assert torch.equal(sample(logits, 0, allowed_tokens=allowed), best)  # greedy among the allowed
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=g, allowed_tokens=torch.tensor(allowed)), best)
    model = make_model()
    out = generate(model, random_prompt(2, 5), 30, seed=3, allowed_tokens=range(100, 110)).tokens
    assert out.min() >= 100 and out.max() < 110
    with pytest.raises(ValueError, match="allowed_tokens must lie"):
        generate(model, random_prompt(1, 4), 3, allowed_tokens=[3, 10_000])
    with pytest.raises(ValueError, match="other than PAD"):
        generate(model, random_prompt(1, 4), 3, allowed_tokens=[PAD_ID])


def test_generate_respects_top_k_and_top_p():
    model = make_model()
    for s in generate_stream(model, random_prompt(3, 5), 25, top_k=3, top_p=0.8, seed=1):
        masked = s.logits.clone()
        masked[:, PAD_ID] = float("-inf")
        top3 = torch.topk(masked, 3, dim=-1).indices
        assert (top3 == s.tokens[:, None]).any(-1).all()


def test_stop_tokens_end_rows():
    model = make_model()
    prompt = random_prompt(2, 6, seed=3)
    free = generate(model, prompt, 20, temperature=0).tokens
    stop = int(free[0, 2])
    out = generate(model, prompt, 20, temperature=0, stop_tokens=[stop])
    for b in range(2):
        hits = (free[b] == stop).nonzero()
        n = int(hits[0]) + 1 if len(hits) else 20
        assert int(out.num_generated[b]) == n
        assert torch.equal(out.tokens[b, :n], free[b, :n])
        assert (out.tokens[b, n:] == PAD_ID).all()
    assert out.num_steps == int(out.num_generated.max())  # the stream ends once every row stopped


def test_batch_rows_match_single_rows():
    model = make_model()
    prompt = random_prompt(3, 7, seed=2)
    batch = generate(model, prompt, 20, temperature=0).tokens
    for b in range(3):
        assert torch.equal(generate(model, prompt[b : b + 1], 20, temperature=0).tokens[0], batch[b])


# ----------------------------------------------------------- cache object, errors


def test_cache_is_not_model_state_and_mode_is_restored():
    model = make_model().train()
    keys = list(model.state_dict())
    generate(model, random_prompt(1, 4), 12)
    assert list(model.state_dict()) == keys and model.training
    cache = KVCache.for_model(model, batch_size=1)
    assert cache.cross.capacity == model.config.context_len
    assert [c.capacity for c in cache.latent] == [model.config.num_latents] * model.config.num_latent_layers


def test_errors():
    model = make_model()
    with pytest.raises(ValueError, match="PAD"):
        generate(model, torch.tensor([[5, 6, 0, 0]]), 3)
    with pytest.raises(ValueError, match="length >= 1"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="reset_fill"):
        generate(model, random_prompt(1, 4), 3, reset_fill=model.config.num_latents + 1)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, random_prompt(1, 4), 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, random_prompt(1, 4), 3, top_p=0)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, torch.tensor([[5, 999]]), 3)
    with pytest.raises(ValueError, match="top_k"):  # checked at the call, before iterating
        generate_stream(model, random_prompt(1, 4), 3, top_k=0)
    cache = KVCache.for_model(model, 1)
    with pytest.raises(ValueError, match="eval"):
        model.train()(random_prompt(1, 4), cache=cache)
    slots = KVSlots(1, 1, 2, 4, ring=False)
    slots.update(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))
    with pytest.raises(ValueError, match="full"):
        slots.update(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))


def test_ring_cache_keeps_the_last_entries():
    slots = KVSlots(1, 1, 3, 1, ring=True)
    slots.update(torch.tensor([1.0, 2.0])[None, None, :, None], torch.zeros(1, 1, 2, 1))
    for x in (3.0, 4.0, 5.0):
        k, _ = slots.update(torch.full((1, 1, 1, 1), x), torch.zeros(1, 1, 1, 1))
    assert sorted(k.flatten().tolist()) == [3.0, 4.0, 5.0]


# -------------------------------------------------------------- CLI, benchmark


def test_cli_generate(tmp_path, capsys):
    from perceiver_ar.cli import main

    model = make_model()
    model.save_pretrained(str(tmp_path / "model"))
    (tmp_path / "prompt.txt").write_text("Once upon")
    assert (
        main(
            ["generate", str(tmp_path / "model"), "--prompt", "Hello", "--max-new-tokens", "6", "--seed", "1"]
        )
        == 0
    )
    first = capsys.readouterr()
    assert first.out.startswith("Hello") and "tokens/s" in first.err
    argv = ["generate", str(tmp_path / "model"), "--prompt-file", str(tmp_path / "prompt.txt")]
    argv += ["--max-new-tokens", "6", "--seed", "1", "--num-samples", "2", "--top-k", "5", "--top-p", "0.9"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("Once upon") == 2
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_finds_the_tokenizer_of_a_training_run(tmp_path):
    from perceiver_ar.commands.generate import TextStream, load_tokenizer
    from perceiver_ar.tokenizer import BPETokenizer, ByteTokenizer

    bpe = BPETokenizer.train(["the cat sat on the mat, the cat ate"] * 20, vocab_size=270)
    store = tmp_path / "store"
    store.mkdir()
    (store / "meta.json").write_text(json.dumps({"modality": "text", "tokenizer": bpe.to_dict()}))
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({"data": str(store)}))
    tok = load_tokenizer(run / "model", None, bpe.vocab_size)
    assert isinstance(tok, BPETokenizer) and tok.decode(tok.encode("the cat")) == "the cat"
    assert isinstance(load_tokenizer(tmp_path, None, 259), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size"):
        load_tokenizer(run / "model", None, 259)
    stream = TextStream(ByteTokenizer())  # a character split over tokens appears once complete
    ids = ByteTokenizer().encode("é!")
    assert [stream.push(i) for i in ids] == ["", "é", "!"]
