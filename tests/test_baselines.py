"""The fair baselines: M = T runs the causal flash kernel with no mask, and the plain decoder computes M = T.

- No N x N (or M x T) mask tensor is built for full rows at any M: every
  tensor an operator returns in a forward and backward is recorded
  (``TorchDispatchMode``) and none may have the shape of a mask; and a fresh
  process at N = 8192 with a narrow model stays far below the size of one.
- ``benchmarks/plain_decoder.py`` (an independent pre-LN decoder) agrees with
  this library's M = T path once its weights are mapped across.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from perceiver_ar.loss import perceiver_ar_loss
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import plain_decoder  # noqa: E402


class ShapeRecorder(TorchDispatchMode):
    """Records the shape and dtype of every tensor an aten operator returns."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), tuple(t.shape), t.dtype))
        return out


def mask_like(outputs, num_latents: int, length: int) -> list:
    """Outputs shaped like an attention mask or score matrix: [..., M, T] or [..., T, T]."""
    shapes = {(num_latents, length), (length, length)}
    return [o for o in outputs if len(o[1]) >= 2 and o[1][-2:] in shapes]


@pytest.mark.parametrize("num_latents", [1, 24, 96])
def test_full_rows_build_no_mask_at_any_m(num_latents):
    """Forward and backward on full rows: no tensor of a mask's shape, at M = 1, M < T and M = T."""
    T = 96  # no model size equals 96 or 24, so a [.., M, T] or [.., T, T] tensor can only be a mask
    model = make_model(context_len=T, num_latents=num_latents, input_dim=32, latent_dim=16).train()
    inputs = torch.randint(3, 259, (2, T), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(3, 259, (2, T), generator=torch.Generator().manual_seed(1))
    recorder = ShapeRecorder()
    with recorder:
        out = model(inputs)
        perceiver_ar_loss(out.logits, targets, out.latent_index).mean.backward()
    assert len(recorder.outputs) > 50  # the recorder saw the whole step
    assert out.logits.shape == (2, num_latents, 259)
    assert mask_like(recorder.outputs, num_latents, T) == []
    # The recorder does see masks: padded rows need one.
    padded = inputs.clone()
    padded[1, T // 2 :] = 0
    recorder = ShapeRecorder()
    with recorder, torch.no_grad():
        model.eval()(padded)
    assert mask_like(recorder.outputs, num_latents, T)


def test_m_equal_t_runs_every_attention_through_the_causal_kernel(monkeypatch):
    """Decoder-only (M = T): each of the L + 1 attentions is SDPA ``is_causal=True`` with no mask.

    (The backward is the kernel's own, so only the forward calls are counted.)
    """
    import perceiver_ar.attention as attention

    calls = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), attn_mask is not None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    T = 40
    model = make_model(context_len=T, num_latents=T).train()
    inputs = torch.randint(3, 259, (2, T), generator=torch.Generator().manual_seed(0))
    out = model(inputs)
    out.logits.sum().backward()
    assert len(calls) == 1 + model.config.num_latent_layers
    assert all(causal and not masked and q[2] == k[2] == T for q, k, masked, causal in calls), calls


MEMORY_PROBE = """
import json, resource, sys, torch
from perceiver_ar import PerceiverAR, PerceiverARConfig
from perceiver_ar.loss import perceiver_ar_loss
torch.set_num_threads(1)
N, M = int(sys.argv[1]), int(sys.argv[2])
model = PerceiverAR(PerceiverARConfig(vocab_size=16, context_len=N, num_latents=M, input_dim=16,
    latent_dim=16, num_latent_layers=1, cross_attend_heads=1, latent_heads=1, cross_attend_widening=1,
    latent_widening=1))
x = torch.randint(3, 16, (1, N))
y = torch.randint(3, 16, (1, N))
warm = model(x[:, :64], num_latents=8)  # touch every code path once at a small size
perceiver_ar_loss(warm.logits, y[:, :64], warm.latent_index).mean.backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = model(x)
perceiver_ar_loss(out.logits, y, out.latent_index).mean.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"before_mb": before, "peak_mb": peak}))
"""


@pytest.mark.parametrize("num_latents", [1024, 8192])
def test_no_mask_memory_at_8192(num_latents):
    """A narrow model's training step at N = 8192 grows the peak far less than one M x N mask would.

    A boolean M x N mask is 8 MiB at M = 1024 and 64 MiB at M = N = 8192, and
    SDPA's float copy of it four times that. Everything else the step holds
    at this width (16 channels, a vocabulary of 16) is a few MiB: measured
    without a mask about 10 MiB at either M, with one 50 and 670 MiB.
    """
    N = 8192
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(N), str(num_latents)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = r["peak_mb"] - r["before_mb"]
    mask_mb = num_latents * N / 2**20  # the boolean mask alone
    assert grown < max(mask_mb, 24.0), f"the step grew the peak by {grown:.1f} MiB (a mask is {mask_mb:.0f})"


# ----------------------------------------------------------------------------
# The plain decoder baseline computes what M = T computes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rotary_fraction", [0.5, 1.0])
def test_plain_decoder_equals_perceiver_ar_with_m_equal_t(rotary_fraction):
    torch.manual_seed(0)
    cfg = plain_decoder.DecoderConfig(
        vocab_size=259, context_len=48, dim=32, num_heads=4, num_blocks=3, rotary_fraction=rotary_fraction
    )
    decoder = plain_decoder.PlainDecoder(cfg).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0), so a wrongly mapped norm shows
        for p in decoder.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model = plain_decoder.to_perceiver_ar(decoder).eval()
    tokens = torch.randint(3, 259, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for T in (48, 17):  # a full context and a shorter one (M = T follows the input)
            ref = decoder(tokens[:, :T])
            out = model(tokens[:, :T], num_latents=T)
            assert torch.equal(out.latent_index[0], torch.arange(T))
            assert ref.abs().max() > 0.1  # a real function, not zeros
            torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-5)
    # Gradients agree too: the two train the same way.
    x, y = tokens[:, :-1], tokens[:, 1:]
    decoder.zero_grad()
    torch.nn.functional.cross_entropy(decoder(x).flatten(0, 1), y.flatten()).backward()
    out = model(x, num_latents=47)
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten()).backward()
    torch.testing.assert_close(
        model.latent_layers[-1].feed_forward.w2.weight.grad,
        decoder.blocks[-1].w2.weight.grad,
        atol=1e-5,
        rtol=1e-4,
    )
    torch.testing.assert_close(
        model.tok_embeddings.weight.grad, decoder.tok_embeddings.weight.grad, atol=1e-5, rtol=1e-4
    )


def test_plain_decoder_config_matches_the_perceiver_ar_sizes():
    """The mapped model has the decoder's parameters plus latent_init and a second copy of the first norm."""
    cfg = plain_decoder.DecoderConfig(context_len=64, dim=32, num_heads=2, num_blocks=3)
    decoder = plain_decoder.PlainDecoder(cfg)
    model = plain_decoder.to_perceiver_ar(decoder)
    extra = cfg.dim * cfg.dim + cfg.dim + 2 * cfg.dim  # latent_init, the kv_norm
    assert model.num_parameters() == sum(p.numel() for p in decoder.parameters()) + extra
    assert model.config.num_latents == model.config.context_len == 64
