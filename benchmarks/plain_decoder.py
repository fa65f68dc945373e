"""A plain decoder-only Transformer: the baseline a user would otherwise pick.

Pre-LayerNorm blocks (``x + attn(LN(x))``, then ``x + MLP(LN(x))``), causal
self-attention through SDPA's flash kernel (``is_causal=True``, no mask
tensor), learned token embeddings, a final LayerNorm and a logits layer. It
is written apart from ``perceiver_ar`` (nothing is imported from it) but at
the same sizes and with the same choices, so that a comparison measures the
architecture and nothing else: width, heads, MLP (4x, squared ReLU, biases
everywhere), vocabulary, LayerNorm eps 1e-5 and the rotary scheme (the first
half of each head's channels rotate, in interleaved pairs, wavelengths
spaced geometrically from 1 to the context length, positions 1..T).

A Perceiver AR with L latent layers has L + 1 attention blocks (the
cross-attend and the latent layers), so the matching decoder has
``num_blocks = L + 1``. ``to_perceiver_ar`` maps the decoder's weights into a
``PerceiverAR`` with M = T that computes the same function (the tests check
it): with E = D, the identity as ``latent_init`` and the first block's
LayerNorm as both the query and the key/value norm, the cross-attend is an
ordinary pre-LN block over every input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DecoderConfig:
    vocab_size: int = 259
    context_len: int = 1024
    dim: int = 512
    num_heads: int = 8
    num_blocks: int = 7  # a Perceiver AR with L = 6 latent layers has 7 attention blocks
    widening: int = 4
    rotary_fraction: float = 0.5
    layer_norm_eps: float = 1e-5

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head: an even number, ``rotary_fraction`` of the head."""
        return int(self.dim // self.num_heads * self.rotary_fraction) // 2 * 2


def rotary_angles(num_positions: int, rotary_dim: int, max_wavelength: float) -> Tensor:
    """Angles [T, rotary_dim / 2] of positions 1..T: wavelengths 1 .. max_wavelength, geometrically spaced."""
    pairs = rotary_dim // 2
    inv_freq = float(max_wavelength) ** -torch.linspace(0.0, 1.0, pairs, dtype=torch.float64)
    positions = torch.arange(1, num_positions + 1, dtype=torch.float64)
    return torch.outer(positions, inv_freq).float()


def rotate(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of the first ``2 * angles.shape[-1]`` channels as complex numbers."""
    r = 2 * angles.shape[-1]
    pairs = torch.view_as_complex(x[..., :r].float().reshape(*x.shape[:-1], r // 2, 2).contiguous())
    turned = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    return torch.cat((turned.to(x.dtype), x[..., r:]), dim=-1)


class Block(nn.Module):
    """Pre-LN: causal multi-head self-attention, then the MLP, each around a residual."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        C = cfg.dim
        self.num_heads = cfg.num_heads
        self.attention_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(C, C) for _ in range(4))
        self.ffn_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.w1 = nn.Linear(C, cfg.widening * C)
        self.w2 = nn.Linear(cfg.widening * C, C)

    def forward(self, x: Tensor, angles: Tensor) -> Tensor:
        B, T, C = x.shape
        h = self.attention_norm(x)
        q, k, v = (w(h).view(B, T, self.num_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        attn = F.scaled_dot_product_attention(rotate(q, angles), rotate(k, angles), v, is_causal=True)
        x = x + self.wo(attn.transpose(1, 2).reshape(B, T, C))
        return x + self.w2(F.relu(self.w1(self.ffn_norm(x))).square())


class PlainDecoder(nn.Module):
    """Token embeddings, ``num_blocks`` pre-LN blocks, a final LayerNorm, logits for every position."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size)
        nn.init.normal_(self.tok_embeddings.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [B, T, V] of full rows [B, T] (no padding): position t predicts token t + 1."""
        cfg = self.config
        T = tokens.shape[1]
        angles = rotary_angles(T, cfg.rotary_dim, cfg.context_len).to(tokens.device)
        x = self.tok_embeddings(tokens)
        for block in self.blocks:
            x = block(x, angles)
        return self.output(self.norm(x))


def perceiver_ar_config(cfg: DecoderConfig) -> dict:
    """The ``PerceiverARConfig`` fields of the Perceiver AR with the decoder's sizes and M = N."""
    return dict(
        vocab_size=cfg.vocab_size,
        context_len=cfg.context_len,
        num_latents=cfg.context_len,
        input_dim=cfg.dim,
        latent_dim=cfg.dim,
        num_latent_layers=cfg.num_blocks - 1,
        cross_attend_heads=cfg.num_heads,
        latent_heads=cfg.num_heads,
        cross_attend_widening=cfg.widening,
        latent_widening=cfg.widening,
        rotary_fraction=cfg.rotary_fraction,
        layer_norm_eps=cfg.layer_norm_eps,
        position_encoding="rotary",
        activation="sq_relu",
        dropout=0.0,
    )


def to_perceiver_ar(decoder: PlainDecoder):
    """A ``PerceiverAR`` (M = N) holding the decoder's weights, computing the same logits.

    Block 0 becomes the cross-attend: ``latent_init`` is the identity (z0 is
    the embedding itself), its LayerNorm serves as both the query norm and the
    key/value norm; blocks 1.. become the latent layers.
    """
    from perceiver_ar import PerceiverAR, PerceiverARConfig

    cfg = decoder.config
    model = PerceiverAR(PerceiverARConfig(**perceiver_ar_config(cfg)))
    first, *rest = decoder.blocks
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(decoder.tok_embeddings.weight)
        model.latent_init.weight.copy_(torch.eye(cfg.dim))
        model.latent_init.bias.zero_()
        ca = model.cross_attend
        for norm in (ca.query_norm, ca.kv_norm):
            norm.load_state_dict(first.attention_norm.state_dict())
        _copy_block(first, ca.attention, ca.ffn_norm, ca.feed_forward)
        for block, layer in zip(rest, model.latent_layers, strict=True):
            layer.attention_norm.load_state_dict(block.attention_norm.state_dict())
            _copy_block(block, layer.attention, layer.ffn_norm, layer.feed_forward)
        model.norm.load_state_dict(decoder.norm.state_dict())
        model.output.load_state_dict(decoder.output.state_dict())
    return model


def _copy_block(block: Block, attention: nn.Module, ffn_norm: nn.Module, feed_forward: nn.Module) -> None:
    for name in ("wq", "wk", "wv", "wo"):
        getattr(attention, name).load_state_dict(getattr(block, name).state_dict())
    ffn_norm.load_state_dict(block.ffn_norm.state_dict())
    feed_forward.w1.load_state_dict(block.w1.state_dict())
    feed_forward.w2.load_state_dict(block.w2.state_dict())
