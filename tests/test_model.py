"""Invariants of the model: causality, padding, latent count, init, input errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from perceiver_ar import PerceiverAR, PerceiverARConfig
from perceiver_ar.attention import build_masks, latent_indices, sequence_lengths
from tests.conftest import make_model


def random_batch(B, T, lengths=None, vocab=259, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (B, T), generator=g)
    if lengths is not None:
        for b, n in enumerate(lengths):
            x[b, n:] = 0
    return x


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
@pytest.mark.parametrize("lengths", [None, [32, 20, 5]])
def test_causality(pe, lengths):
    """Changing input t never changes a latent on an input before t."""
    for seed in range(3):
        model = make_model(pe, seed=seed, absolute_table="learned" if seed % 2 else "sinusoidal")
        x = random_batch(3, 32, lengths, seed=seed)
        with torch.no_grad():
            base = model(x)
        valid_len = sequence_lengths(x)
        for t in (0, 3, 17, 26, 31):
            x2 = x.clone()
            rows = valid_len > t
            x2[rows, t] = 3 + (x2[rows, t] - 3 + 1) % 256  # another data token
            with torch.no_grad():
                out = model(x2)
            before = (base.latent_index < t) & (base.latent_index >= 0)
            after = base.latent_index >= t
            assert torch.allclose(out.logits[before], base.logits[before], atol=1e-6)
            if (after & rows[:, None]).any():  # the test can see a change where one must happen
                assert not torch.allclose(
                    out.logits[after & rows[:, None]], base.logits[after & rows[:, None]]
                )


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_padding_invariance(pe):
    """A row's logits do not depend on how much padding follows it, nor on its batch mates."""
    model = make_model(pe)
    row = random_batch(1, 20, seed=3)
    with torch.no_grad():
        alone = model(row).logits  # no padding: the fast path
        for T in (21, 26, 32):
            padded = torch.zeros(2, T, dtype=torch.long)
            padded[0, :20] = row[0]
            padded[1] = random_batch(1, T, seed=4)[0]
            out = model(padded)
            assert out.latent_index[0].tolist() == list(range(12, 20))
            torch.testing.assert_close(out.logits[:1], alone, atol=1e-5, rtol=1e-5)


def test_short_rows_have_invalid_latents_and_finite_logits():
    model = make_model()
    x = random_batch(2, 32, [3, 1])
    with torch.no_grad():
        out = model(x)
    assert out.latent_index[0].tolist() == [-1] * 5 + [0, 1, 2]
    assert out.latent_index[1].tolist() == [-1] * 7 + [0]
    assert torch.isfinite(out.logits).all()


def test_masks_match_official_semantics():
    x = random_batch(2, 10, [10, 6])
    li = latent_indices(sequence_lengths(x), 4)
    assert li.tolist() == [[6, 7, 8, 9], [2, 3, 4, 5]]
    masks = build_masks(x, li, None, full_rows=False)
    cross = masks.cross.dense(10)[:, 0]
    j = torch.arange(10)
    for b in range(2):
        for m in range(4):
            expect = (j <= li[b, m]) & (x[b] != 0)
            assert torch.equal(cross[b, m], expect)
    lat = masks.latent[:, 0]
    assert torch.equal(lat[0], torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def naive_decoder(model, x):
    """Independent decoder-only computation (M = T) with explicit loops over positions."""
    cfg = model.config
    B, T = x.shape
    pos = torch.arange(1, T + 1, dtype=torch.float32)

    def rotate(v, dh, r):  # v [T, H, dh]
        if cfg.position_encoding != "rotary":
            return v
        nb = r // 2
        inv = 1.0 / cfg.max_wavelength ** ((2.0 / r) * torch.linspace(0, nb, nb))
        ang = pos[:, None] * inv[None]  # [T, nb]
        rot = torch.view_as_complex(v[..., :r].reshape(T, -1, nb, 2).contiguous())
        rot = rot * torch.polar(torch.ones_like(ang), ang)[:, None, :]
        return torch.cat([torch.view_as_real(rot).reshape(T, -1, r), v[..., r:]], dim=-1)

    def mha(attn, q_in, kv_in, heads, r):
        dh = attn.wq.out_features // heads
        q = rotate(attn.wq(q_in).view(T, heads, dh), dh, r)
        k = rotate(attn.wk(kv_in).view(T, heads, dh), dh, r)
        v = attn.wv(kv_in).view(T, heads, dh)
        out = torch.zeros(T, heads, dh)
        for t in range(T):
            s = torch.einsum("hd,jhd->hj", q[t], k[: t + 1]) / math.sqrt(dh)
            out[t] = torch.einsum("hj,jhd->hd", s.softmax(-1), v[: t + 1])
        return attn.wo(out.reshape(T, -1))

    logits = []
    for b in range(B):
        emb = model.tok_embeddings(x[b])
        if cfg.position_encoding == "absolute":
            emb = emb + model.pos_embeddings[0](torch.arange(1, T + 1))
        ca = model.cross_attend
        z = model.latent_init(emb)
        z = z + mha(
            ca.attention,
            ca.query_norm(z),
            ca.kv_norm(emb),
            cfg.cross_attend_heads,
            cfg.cross_attend_rotary_dim,
        )
        z = z + ca.feed_forward(ca.ffn_norm(z))
        for layer in model.latent_layers:
            h = layer.attention_norm(z)
            z = z + mha(layer.attention, h, h, cfg.latent_heads, cfg.latent_rotary_dim)
            z = z + layer.feed_forward(layer.ffn_norm(z))
        logits.append(model.output(model.norm(z)))
    return torch.stack(logits)


@pytest.mark.parametrize("pe", ["rotary", "absolute"])
def test_num_latents_equal_to_length_is_a_decoder_only_transformer(pe):
    model = make_model(pe)
    x = random_batch(2, 20)
    with torch.no_grad():
        out = model(x, num_latents=20)
        ref = naive_decoder(model, x)
    assert out.logits.shape == (2, 20, 259)
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-4)


def test_num_latents_override_runs_with_other_counts():
    model = make_model()
    x = random_batch(2, 32, [32, 25])
    with torch.no_grad():
        for m in (1, 4, 8, 16, 32):
            out = model(x, num_latents=m)
            assert out.logits.shape == (2, m, 259)
            assert out.latent_index[0, -1] == 31 and out.latent_index[1, -1] == 24
            assert torch.isfinite(out.logits).all()
        # The last latent of M'=1 sees every input but no other latent, so it differs from M'=8.
        assert not torch.allclose(model(x, num_latents=1).logits[:, -1], model(x).logits[:, -1])


def test_official_initialisation():
    torch.manual_seed(0)
    cfg = PerceiverARConfig(
        context_len=64, num_latents=16, input_dim=256, latent_dim=128, num_latent_layers=1
    )
    model = PerceiverAR(cfg)
    # Truncated normal std 1 cut at +-2 has std 0.880.
    assert abs(model.tok_embeddings.weight.std().item() - 0.880) < 0.01
    assert model.tok_embeddings.weight.abs().max() <= 2.0
    w = model.cross_attend.feed_forward.w1.weight  # fan-in 128
    assert abs(w.std().item() - 1 / math.sqrt(128)) < 0.05 / math.sqrt(128)
    assert model.cross_attend.attention.wq.bias.abs().max() == 0
    assert model.output.weight.abs().max() == 0  # zero logits layer by default
    out = model(torch.randint(3, 259, (2, 64)))
    assert out.logits.abs().max() == 0
    # Zero logits give ln V cross-entropy per token.
    ce = F.cross_entropy(out.logits.flatten(0, 1), torch.randint(3, 259, (32,)))
    assert abs(ce.item() - math.log(259)) < 1e-5


def test_bad_inputs_are_clear_errors():
    model = make_model("absolute", position_table_sizes=(40,))
    with pytest.raises(ValueError, match="exceeds context_len"):
        model(torch.randint(3, 259, (1, 33)))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 259\)"):
        model(torch.full((1, 8), 300))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        model(torch.randint(3, 259, (8,)))
    with pytest.raises(ValueError, match="outside the position table"):
        model(torch.randint(3, 259, (1, 8)), positions=torch.arange(35, 43)[None])
    with pytest.raises(ValueError, match="num_latents"):
        model(torch.randint(3, 259, (1, 8)), num_latents=0)
    with pytest.raises(ValueError, match="divisible"):
        PerceiverARConfig(input_dim=30, cross_attend_heads=4)
    with pytest.raises(ValueError, match="unknown preset"):
        PerceiverARConfig.from_preset("nope")
