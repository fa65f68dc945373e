"""The decode step on packed weights computes what ``PerceiverAR.decode_step`` computes.

It is the step ``generate`` runs on the CPU, so the generation tests (cache ==
recompute, the golden samples, sliding, resets) all go through it; here it
is compared with the model's own step directly, and generation with it with
generation without it.
"""

from __future__ import annotations

import sys

import pytest
import torch

from perceiver_ar.generate import generate_stream, prefill
from perceiver_ar.kv_cache import KVCache
from perceiver_ar.packed_decode import PackedLinear, decode_step, pack
from tests.conftest import make_model

generation = sys.modules["perceiver_ar.generate"]  # the package's ``generate`` is the function


def primed_pair(model, B=2, T=6, new=10):
    """Two caches primed identically with a prompt of T: (cache_a, cache_b, prompt, positions of T + new)."""
    prompt = torch.randint(3, 259, (B, T), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(T + new).expand(B, T + new)
    if len(model.config.position_table_sizes) > 1:  # a second axis: position modulo its table
        positions = torch.stack((positions, positions % model.config.position_table_sizes[1]), dim=-1)
    caches = []
    for _ in range(2):
        cache = KVCache.for_model(model, B, T + new, new)
        prefill(model, prompt, positions[:, :T], 1, cache)
        caches.append(cache)
    return caches[0], caches[1], prompt, positions


def assert_caches_close(a, b):
    for x, y in zip([a.cross, *a.latent], [b.cross, *b.latent], strict=True):
        torch.testing.assert_close(x.k, y.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.v, y.v, atol=1e-5, rtol=1e-5)
        assert torch.equal(x.bias, y.bias) and torch.equal(x.cursor, y.cursor)


@pytest.mark.parametrize(
    "pe, overrides",
    [
        ("rotary", {}),
        ("absolute", {}),
        ("absolute", {"position_table_sizes": (40, 7)}),  # two position axes
        ("rotary", {"input_dim": 16, "latent_dim": 16, "cross_attend_heads": 4}),  # E = D
    ],
)
def test_packed_step_and_reset_match_the_models_step(pe, overrides):
    model = make_model(pe, **overrides)
    packed = pack(model)
    ours, reference, prompt, positions = primed_pair(model)
    tokens = torch.randint(3, 259, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        T = prompt.shape[1]
        for t in range(3):  # three one-token steps
            pos = positions[:, T + t : T + t + 1]
            got = decode_step(model, packed, tokens[:, t : t + 1], pos, ours)
            want = model.decode_step(tokens[:, t : t + 1], pos, reference).logits[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert_caches_close(ours, reference)
        for cache in (ours, reference):  # a reset from the cache: four latents at once
            cache.clear_latents()
        pos = positions[:, T : T + 4]  # the newest four inputs (only the last is new to the cache)
        got = decode_step(model, packed, tokens, pos, ours)
        want = model.decode_step(tokens, pos, reference).logits[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert_caches_close(ours, reference)


def test_packed_step_reads_narrow_phases(monkeypatch):
    """Every packed rotation is in place: it asks for the rotated pairs' phases only, not widened ones."""
    model = make_model("rotary")
    cfg = model.config
    pos = torch.arange(1, 7).expand(2, 6)
    wide, narrow = model.rotary(pos, pos), model.rotary(pos, pos, widen=False)
    assert wide.cross_q[2].shape[-1] == cfg.cross_attend_head_dim // 2
    assert narrow.cross_q[2].shape[-1] == cfg.cross_attend_rotary_dim // 2
    assert narrow.latent[2].shape[-1] == cfg.latent_rotary_dim // 2
    assert torch.equal(wide.cross_q[2][..., : cfg.cross_attend_rotary_dim // 2], narrow.cross_q[2])
    asked = []
    real = type(model).rotary
    monkeypatch.setattr(type(model), "rotary", lambda self, *a, **k: asked.append(k) or real(self, *a, **k))
    ours, _, prompt, positions = primed_pair(model)
    asked.clear()
    with torch.no_grad():
        decode_step(
            model, pack(model), prompt[:, -1:], positions[:, prompt.shape[1] : prompt.shape[1] + 1], ours
        )
    assert asked == [{"widen": False}]


def test_packed_step_refuses_training_mode():
    model = make_model()
    cache, _, prompt, positions = primed_pair(model)
    model.train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        decode_step(model, pack(model), prompt[:, -1:], positions[:, 6:7], cache)


def test_layouts_copies_and_shared_weights():
    """Wide matrices are stored transposed ([in, out]); square and narrow ones are the model's own."""
    model = make_model(input_dim=16, latent_dim=16)
    packed = pack(model)
    layer, weights = model.latent_layers[0], packed.latent[0]
    attn = layer.attention
    assert weights.q.transposed and weights.q.weight.shape == (16, 48)
    torch.testing.assert_close(
        weights.q.weight, torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]).t()
    )
    assert weights.w1.transposed and weights.w1.weight.is_contiguous()
    for shared, linear in ((weights.out, attn.wo), (weights.w2, layer.feed_forward.w2)):
        assert not shared.transposed and shared.weight.data_ptr() == linear.weight.data_ptr()
        assert shared.bias.data_ptr() == linear.bias.data_ptr()  # nothing copied
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(weights.w1(x), layer.feed_forward.w1(x))
    torch.testing.assert_close(weights.out(x), attn.wo(x))
    with pytest.raises(ValueError, match="bias"):
        PackedLinear(torch.nn.Linear(4, 8, bias=False))


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_generation_with_and_without_packing_agree(pe, monkeypatch):
    """Through resets and past N (the ring slides): the same greedy tokens, logits to float tolerance."""
    model = make_model(pe)
    N, M = model.config.context_len, model.config.num_latents
    prompt = torch.randint(3, 259, (2, 5), generator=torch.Generator().manual_seed(3))
    n_new = N + 2 * M
    packed = list(generate_stream(model, prompt, n_new, temperature=0))
    monkeypatch.setattr(generation, "PACKED_DEVICE_TYPES", ())
    unpacked = list(generate_stream(model, prompt, n_new, temperature=0))
    assert [s.mode for s in packed].count("reset") >= 3
    for a, b in zip(packed, unpacked, strict=True):
        assert torch.equal(a.tokens, b.tokens), f"step {a.index} ({a.mode})"
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_generate_packs_on_the_cpu(monkeypatch):
    """generate's CPU steps go through the packed step (and not when packing is off)."""
    calls = []
    original = generation.packed_decode.decode_step

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(generation.packed_decode, "decode_step", spy)
    model = make_model()
    generation.generate(model, torch.randint(3, 259, (1, 5)), 4, temperature=0)
    assert len(calls) == 3  # the prime is a full forward; the three later steps are packed
    packs = []
    original_pack = generation.packed_decode.pack
    monkeypatch.setattr(generation.packed_decode, "pack", lambda m: packs.append(1) or original_pack(m))
    generation.generate(model, torch.randint(3, 259, (1, 5)), 1, temperature=0)
    assert packs == [] and len(calls) == 3  # one new token is the prime alone: nothing to pack for
    monkeypatch.setattr(generation, "PACKED_DEVICE_TYPES", ())
    generation.generate(model, torch.randint(3, 259, (1, 5)), 4, temperature=0)
    assert packs == [] and len(calls) == 3
