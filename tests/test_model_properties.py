"""Property tests of the public model API (hypothesis): random configs, batches, lengths, padding,
dtypes, num_latents and positions. Every call either raises ValueError, exactly when the input is
invalid, or returns finite logits that are causal and do not depend on a row's padding or batch."""

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from perceiver_ar import PerceiverAR, PerceiverARConfig

PAD = 0


@st.composite
def models(draw):
    heads = draw(st.sampled_from([1, 2]))
    N = draw(st.integers(2, 10))
    cfg = PerceiverARConfig(
        vocab_size=draw(st.integers(4, 12)),
        context_len=N,
        num_latents=draw(st.integers(1, N)),
        input_dim=heads * draw(st.sampled_from([4, 8])),
        latent_dim=heads * draw(st.sampled_from([4, 8])),
        num_latent_layers=draw(st.integers(0, 2)),
        cross_attend_heads=heads,
        latent_heads=heads,
        position_encoding=draw(st.sampled_from(["rotary", "absolute"])),
        final_layer_init_zeros=False,  # zero logits would make every comparison trivial
    )
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return PerceiverAR(cfg).eval()


PROBLEMS = [
    "an empty batch",
    "an empty row",
    "left padding",
    "middle padding",
    "an id outside the vocabulary",
    "float ids",
    "longer than N",
    "a bad num_latents",
    "positions of another shape",
    "a negative position",
    "float positions",
]


@st.composite
def calls(draw, model):
    """(inputs, kwargs, problem): a valid call (problem None) or one with exactly one problem."""
    cfg = model.config
    N, V = cfg.context_len, cfg.vocab_size
    problem = draw(st.sampled_from(PROBLEMS)) if draw(st.booleans()) else None
    B = 0 if problem == "an empty batch" else draw(st.integers(1, 3))
    T = N + 1 if problem == "longer than N" else draw(st.integers(1, N))
    lengths = [draw(st.integers(1, T)) for _ in range(B)]
    if problem == "an empty row":
        lengths[-1] = 0
    if problem == "left padding":
        T, lengths = max(T, 2), [min(n, max(T, 2) - 1) for n in lengths]
    if problem == "middle padding" and N < 3:
        problem = None  # no room for a hole in a row: this call is valid after all
    if problem == "middle padding":
        T = max(T, 3)
        lengths = [max(2, min(n, T - 1)) for n in lengths]
    rows = []
    for n in lengths:
        tokens = [draw(st.integers(1, V - 1)) for _ in range(n)]
        rows.append(tokens + [PAD] * (T - n))
    if B and problem == "left padding":
        rows[0] = [PAD] * (T - lengths[0]) + rows[0][: lengths[0]]
    if B and problem == "middle padding":
        n = lengths[0]
        rows[0] = rows[0][:1] + [PAD] * (T - n) + rows[0][1:n]
    if B and problem == "an id outside the vocabulary":
        rows[0][0] = draw(st.sampled_from([V, V + 3, -1]))
    int_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8]))
    dtype = torch.float32 if problem == "float ids" else int_dtype
    if dtype == torch.uint8 and problem == "an id outside the vocabulary":
        dtype = torch.int64  # -1 does not fit in uint8
    inputs = torch.tensor(rows, dtype=torch.int64).reshape(B, T).to(dtype)
    kwargs = {}
    if problem == "a bad num_latents":
        kwargs["num_latents"] = draw(st.sampled_from([0, -1, N + 1, 2.5, "4", True]))
    elif draw(st.booleans()):
        kwargs["num_latents"] = draw(st.sampled_from([1, N, draw(st.integers(1, N)), float(N)]))
    if problem in ("positions of another shape", "a negative position", "float positions") or draw(
        st.booleans()
    ):
        pos = torch.arange(1, T + 1).expand(B, T) * (inputs != PAD).long()
        if problem == "positions of another shape":
            pos = pos[:, :-1] if T > 1 else torch.cat([pos, pos], dim=1)
        elif problem == "a negative position" and B:
            pos = pos.clone()
            pos[0, 0] = -1
        elif problem == "float positions":
            pos = pos.float()
        kwargs["positions"] = pos
    return inputs, kwargs, problem


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_call_returns_valid_logits_or_raises_value_error(data):
    model = data.draw(models())
    inputs, kwargs, problems = data.draw(calls(model))
    event("valid" if problems is None else f"invalid: {problems}")
    cfg = model.config
    try:
        with torch.no_grad():
            out = model(inputs, **kwargs)
    except ValueError:
        assert problems, "a valid call was refused"
        return
    assert problems is None, f"accepted {problems}"
    B, T = inputs.shape
    num_latents = kwargs.get("num_latents")
    M = min(cfg.num_latents if num_latents is None else int(num_latents), T)
    assert out.logits.shape == (B, M, cfg.vocab_size)
    assert torch.isfinite(out.logits).all()
    lengths = (inputs != PAD).sum(1)
    for b in range(B):
        n = int(lengths[b])
        valid = out.latent_index[b] >= 0
        assert int(valid.sum()) == min(M, n)
        # Padding and batch invariance: the row alone, without its padding, gives the same logits.
        row = inputs[b : b + 1, :n]
        alone_kwargs = dict(kwargs)
        if "positions" in kwargs:
            alone_kwargs["positions"] = kwargs["positions"][b : b + 1, :n]
        with torch.no_grad():
            alone = model(row, **alone_kwargs)
        # The padded batch runs masked attention, the row alone the mask-free full-row kernels:
        # the same sums in another order, so fp32 rounding (about 1e-5 on logits of order 1).
        torch.testing.assert_close(
            out.logits[b, valid], alone.logits[0, alone.latent_index[0] >= 0], atol=1e-4, rtol=1e-4
        )
        # Causality: changing the last token changes no prediction made before it.
        if n >= 2:
            changed = row.clone()
            changed[0, -1] = 1 + (int(changed[0, -1]) % (cfg.vocab_size - 1))
            with torch.no_grad():
                after = model(changed, **alone_kwargs)
            earlier = (alone.latent_index[0] >= 0) & (alone.latent_index[0] < n - 1)
            torch.testing.assert_close(after.logits[0, earlier], alone.logits[0, earlier])
