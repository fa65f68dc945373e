"""The Perceiver AR model (Hawthorne, Jaegle et al., ICML 2022).

A long input of T <= N tokens is embedded once; the last M valid inputs host
the latents. One causally masked cross-attend lets every latent read the
inputs up to its own, then L causal self-attention layers run over the M
latents only, and each latent predicts the token after its input.

This file holds only modules and the functions they need; it computes exactly
what the official JAX/Haiku implementation computes (see shared/golden).
Shape letters: B batch, T inputs, M latents, H heads, E input width,
D latent width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import PerceiverARConfig

if TYPE_CHECKING:  # the cache lives with the generator; the model only writes to it
    from .generate import KVCache, KVSlots

PAD_ID = 0
EOS_ID = 1
SOS_ID = 2
TOKEN_OFFSET = 3  # data token k has id k + 3
# Query-chunk size of the cross-attend when autograd is off and the config sets none.
INFERENCE_CROSS_ATTEND_CHUNK = 128


# ----------------------------------------------------------------------------
# Positions, masks and rotary tables
# ----------------------------------------------------------------------------


def default_positions(inputs: Tensor) -> Tensor:
    """1-based positions of a right-padded batch, 0 on padding. [B, T]."""
    B, T = inputs.shape
    pos = torch.arange(1, T + 1, device=inputs.device).expand(B, T)
    return pos * (inputs != PAD_ID)


def sequence_lengths(inputs: Tensor) -> Tensor:
    """Index of the first PAD in each row, or T if there is none. [B]."""
    B, T = inputs.shape
    is_pad = inputs == PAD_ID
    first_pad = torch.where(is_pad, torch.arange(T, device=inputs.device), torch.full_like(inputs, T))
    return first_pad.min(dim=1).values


def latent_indices(lengths: Tensor, num_latents: int) -> Tensor:
    """Input index each latent sits on, right-aligned to the row's valid length.

    Rows shorter than M get invalid leading latents, marked -1. [B, M].
    """
    offsets = torch.arange(-num_latents, 0, device=lengths.device)
    return (lengths[:, None] + offsets).clamp(min=-1)


@dataclass
class Masks:
    """Boolean attention masks (True = attend), built once per forward.

    ``None`` means no mask is needed; ``latent_causal`` says the latent layers
    can use the plain square causal kernel instead of ``latent``.
    """

    cross: Tensor | None  # [B or 1, 1, M, T]
    latent: Tensor | None  # [B, 1, M, M]
    latent_causal: bool
    # Latents with no visible input; the official code gives them a uniform
    # softmax over all T inputs (scores filled with -1e30). [B, M] or None.
    uniform_rows: Tensor | None
    # Every row is full: ``cross`` is the bottom-right band (all T - M prefix
    # inputs, then a causal M x M square), so the cross-attend can run as two
    # mask-free kernels (see ``PrefixCausalAttention``).
    cross_band: bool = False


def build_masks(inputs: Tensor, latent_index: Tensor, input_keep: Tensor | None) -> Masks:
    """Masks of the official ``final_block`` style.

    A latent on input s sees input j iff j <= s and x[j] != PAD (and, with the
    mask form of cross-attend dropout, j was kept or j == s). Latents see
    latents on the same or earlier inputs; invalid latents (-1) are hidden as
    keys and see only themselves.
    """
    B, T = inputs.shape
    M = latent_index.shape[1]
    key_valid = inputs != PAD_ID  # [B, T]
    fast = bool(key_valid.all()) and T >= M and input_keep is None
    j = torch.arange(T, device=inputs.device)
    if fast:
        # Every row is full: latents sit on T-M..T-1 in every row, the cross
        # mask is one bottom-right causal band shared by the batch (built by
        # the cross-attend only if its kernel needs it: ``band_mask``), and
        # the latent layers are plainly causal.
        return Masks(cross=None, latent=None, latent_causal=True, uniform_rows=None, cross_band=True)

    cross = (j[None, None, :] <= latent_index[:, :, None]) & key_valid[:, None, :]
    if input_keep is not None:
        own = j[None, None, :] == latent_index[:, :, None]
        cross = cross & (input_keep[:, None, :] | own)
    valid = latent_index >= 0
    uniform_rows = None
    if not bool(valid.all()):
        # An invalid latent has no visible input. SDPA would return NaN for an
        # all-False row, so let it see every key here and overwrite its output
        # with the uniform mean afterwards (what a -1e30 fill produces).
        cross = cross | ~valid[:, :, None]
        uniform_rows = ~valid
    latent = (latent_index[:, :, None] >= latent_index[:, None, :]) & valid[:, None, :]
    latent = latent | torch.eye(M, dtype=torch.bool, device=inputs.device)
    return Masks(
        cross=cross.unsqueeze(1),
        latent=latent.unsqueeze(1),
        latent_causal=False,
        uniform_rows=uniform_rows,
    )


def band_mask(num_latents: int, num_inputs: int, device: torch.device) -> Tensor:
    """The cross mask of full rows: latent m (on input T-M+m) sees inputs 0..T-M+m. [1, 1, M, T]."""
    j = torch.arange(num_inputs, device=device)
    last = torch.arange(num_inputs - num_latents, num_inputs, device=device)
    return (j[None, :] <= last[:, None])[None, None]


def rotary_tables(positions: Tensor, rotary_dim: int, max_wavelength: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, [B, 1, T, rotary_dim / 2].

    The official frequencies come from a ``linspace`` that includes its end
    point: exponents run over [0, 1] inclusive, so for 4 rotated channels and
    max_wavelength 64 the wavelengths are 1 and 64.
    """
    num_bands = rotary_dim // 2
    exponents = (2.0 / rotary_dim) * torch.linspace(0, num_bands, num_bands, dtype=torch.float64)
    inv_freq = (1.0 / (float(max_wavelength) ** exponents)).to(torch.float32)
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


class PrefixCausalAttention(torch.autograd.Function):
    """SDPA of M queries on T keys: all T - M prefix keys, then the last M causally.

    Exactly ``softmax(q k^T + band mask) v`` for the full-row cross-attend,
    without the [M, T] mask: SDPA on CPU converts a boolean mask into a float
    copy four times its size in the forward and again in the backward, and
    cannot skip masked blocks. Here two fused CPU flash kernels run (the prefix
    unmasked, the last M keys with the square causal mask) and their outputs
    merge by log-sum-exp. The backward of a key block needs only the merged
    output and log-sum-exp, so it is exact too. q [B, H, M, dh], k and v
    [B, H, T, dh] with T > M; CPU only.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        P = k.shape[2] - q.shape[2]  # prefix inputs visible to every latent
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_prefix, lse_prefix = flash(q, k[:, :, :P], v[:, :, :P], 0.0, False)
        out_square, lse_square = flash(q, k[:, :, P:], v[:, :, P:], 0.0, True)
        lse = torch.logaddexp(lse_prefix, lse_square)  # [B, H, M]
        out = torch.exp(lse_prefix - lse)[..., None] * out_prefix
        out.addcmul_(torch.exp(lse_square - lse)[..., None], out_square)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        P = k.shape[2] - q.shape[2]
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_out = grad_out.contiguous()
        dq, dk_prefix, dv_prefix = backward(grad_out, q, k[:, :, :P], v[:, :, :P], out, lse, 0.0, False)
        dq_square, dk_square, dv_square = backward(grad_out, q, k[:, :, P:], v[:, :, P:], out, lse, 0.0, True)
        return dq + dq_square, torch.cat((dk_prefix, dk_square), 2), torch.cat((dv_prefix, dv_square), 2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (interleaved style) of the first channels.

    x [B, H, T, dh]; only the first 2 * cos.shape[-1] channels of each head
    rotate, the rest pass through.
    """
    r = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x0, x1 = x_rot.unflatten(-1, (r // 2, 2)).unbind(-1)
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def apply_rotary_(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``apply_rotary`` in place, for inference: x must not need gradients.

    The out-of-place form holds about four copies of the rotated channels at
    once; at 131,072 inputs that is the peak of a forward pass. Here the
    only temporary is one copy of the even channels.
    """
    r = 2 * cos.shape[-1]
    pairs = x[..., :r].unflatten(-1, (r // 2, 2))
    x0, x1 = pairs.unbind(-1)
    x0_orig = x0.clone()
    x0.mul_(cos).addcmul_(x1, sin, value=-1.0)  # x0 cos - x1 sin
    x1.mul_(cos).addcmul_(x0_orig, sin)  # x1 cos + x0 sin
    return x


def sinusoidal_table(num_positions: int, dim: int) -> Tensor:
    """The official sinusoidal position table: sines in the first half, cosines after."""
    half = dim // 2
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(half, dtype=torch.float64) * (-math.log(10000.0) / (half - 1)))
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, :half] = torch.sin(position * div)
    table[:, half : 2 * half] = torch.cos(position * div)
    return table.to(torch.float32)


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------


def squared_relu(x: Tensor) -> Tensor:
    return F.relu(x).square()


def gelu_tanh(x: Tensor) -> Tensor:
    # jax.nn.gelu defaults to the tanh approximation.
    return F.gelu(x, approximate="tanh")


ACTIVATION_FNS = {"sq_relu": squared_relu, "gelu": gelu_tanh}


class FeedForward(nn.Module):
    """Linear(C -> wC), activation, Linear(wC -> C)."""

    def __init__(self, dim: int, widening: int, activation: str, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, widening * dim)
        self.w2 = nn.Linear(widening * dim, dim)
        self.act = ACTIVATION_FNS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w2(self.act(self.w1(x))))


class Attention(nn.Module):
    """Multi-head attention for both the cross-attend and the latent layers.

    q comes from ``q_dim`` features, k and v from ``kv_dim`` features, all
    projected to ``qk_dim`` channels split into heads; the output maps back to
    ``out_dim``. Rotary, when used, is applied to q and k; never to v.
    """

    def __init__(self, q_dim: int, kv_dim: int, qk_dim: int, out_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.wq = nn.Linear(q_dim, qk_dim)
        self.wk = nn.Linear(kv_dim, qk_dim)
        self.wv = nn.Linear(kv_dim, qk_dim)
        self.wo = nn.Linear(qk_dim, out_dim)

    def split_heads(self, x: Tensor) -> Tensor:
        # [B, T, H*dh] -> [B, H, T, dh]: channel c belongs to head c // dh.
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def queries(self, x_q: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        q = self.split_heads(self.wq(x_q))
        return q if rope is None else apply_rotary(q, *rope)

    def keys_values(self, x_kv: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Projected keys (rotated) and values, [B, H, T, dh] each."""
        k = self.split_heads(self.wk(x_kv))
        v = self.split_heads(self.wv(x_kv))
        if rope is None:
            return k, v
        rotate = apply_rotary_ if not (torch.is_grad_enabled() and k.requires_grad) else apply_rotary
        return rotate(k, *rope), v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        is_causal: bool = False,
        uniform_rows: Tensor | None = None,
    ) -> Tensor:
        """Scaled dot-product attention and the output projection. [B, Lq, out]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        if uniform_rows is not None:
            out = torch.where(uniform_rows[:, None, :, None], v.mean(dim=2, keepdim=True), out)
        return self.wo(out.transpose(1, 2).flatten(2))

    def forward(
        self,
        x_q: Tensor,
        x_kv: Tensor,
        mask: Tensor | None,
        rope_q: tuple[Tensor, Tensor] | None,
        rope_k: tuple[Tensor, Tensor] | None,
        is_causal: bool = False,
        uniform_rows: Tensor | None = None,
    ) -> Tensor:
        q = self.queries(x_q, rope_q)
        k, v = self.keys_values(x_kv, rope_k)
        return self.attend(q, k, v, mask, is_causal, uniform_rows)


class CrossAttend(nn.Module):
    """Latents (D wide) read the embedded inputs (E wide), with a query residual."""

    def __init__(self, cfg: PerceiverARConfig):
        super().__init__()
        E, D = cfg.input_dim, cfg.latent_dim
        self.cfg = cfg
        self.query_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.kv_norm = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.attention = Attention(D, E, E, D, cfg.cross_attend_heads)
        self.ffn_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(D, cfg.cross_attend_widening, cfg.activation, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        z0: Tensor,
        emb: Tensor,
        masks: Masks,
        rope_q: tuple[Tensor, Tensor] | None,
        rope_k: tuple[Tensor, Tensor] | None,
        cache: KVSlots | None = None,
    ) -> Tensor:
        q = self.attention.queries(self.query_norm(z0), rope_q)  # [B, H, M, E/H]
        k, v = self.attention.keys_values(self.kv_norm(emb), rope_k)  # [B, H, T, E/H]
        if cache is not None:
            # Generation: store these inputs' keys/values, attend to every cached one.
            k, v = cache.update(k, v)
        chunk = self.cfg.cross_attend_chunk_size
        M, T = q.shape[2], k.shape[2]
        cross_mask = masks.cross
        if masks.cross_band:
            if cache is None and T > M and q.device.type == "cpu":
                # Full rows on CPU: two mask-free kernels, exact, less time and memory.
                out = PrefixCausalAttention.apply(q, k, v)  # [B, H, M, E/H]
                z = z0 + self.dropout(self.attention.wo(out.transpose(1, 2).flatten(2)))
                return z + self.feed_forward(self.ffn_norm(z))
            cross_mask = band_mask(M, T, q.device)
        if chunk <= 0 and cross_mask is not None and not torch.is_grad_enabled():
            # SDPA on CPU turns a boolean mask into a float copy four times its
            # size (+512 MB for M = 1024, T = 131,072). Without autograd, query
            # chunks cost no time and bound that copy to chunk x T.
            chunk = INFERENCE_CROSS_ATTEND_CHUNK
        if chunk <= 0 or chunk >= M:
            attn = self.attention.attend(q, k, v, cross_mask, uniform_rows=masks.uniform_rows)
        else:
            # Query chunks bound the memory of the mask and the kernel's
            # workspace to chunk x T per head.
            pieces = []
            for start in range(0, M, chunk):
                sl = slice(start, start + chunk)
                mask = None if cross_mask is None else cross_mask[:, :, sl]
                rows = None if masks.uniform_rows is None else masks.uniform_rows[:, sl]
                pieces.append(self.attention.attend(q[:, :, sl], k, v, mask, uniform_rows=rows))
            attn = torch.cat(pieces, dim=1)
        z = z0 + self.dropout(attn)
        return z + self.feed_forward(self.ffn_norm(z))


class LatentLayer(nn.Module):
    """Pre-LN causal self-attention and MLP over the latents."""

    def __init__(self, cfg: PerceiverARConfig):
        super().__init__()
        D = cfg.latent_dim
        self.attention_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attention = Attention(D, D, D, D, cfg.latent_heads)
        self.ffn_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(D, cfg.latent_widening, cfg.activation, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        z: Tensor,
        masks: Masks,
        rope: tuple[Tensor, Tensor] | None,
        cache: KVSlots | None = None,
    ) -> Tensor:
        h = self.attention_norm(z)
        q = self.attention.queries(h, rope)
        k, v = self.attention.keys_values(h, rope)
        if cache is not None:
            k, v = cache.update(k, v)  # this layer's latents so far, the new ones last
        attn = self.attention.attend(
            q, k, v, masks.latent, is_causal=masks.latent_causal and masks.latent is None
        )
        z = z + self.dropout(attn)
        return z + self.feed_forward(self.ffn_norm(z))


@dataclass
class PerceiverAROutput:
    logits: Tensor  # [B, M, V]
    latent_index: Tensor  # [B, M] input index of each latent, -1 if invalid


class PerceiverAR(nn.Module):
    """Perceiver AR: one causal cross-attend onto M latents, then L latent layers."""

    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        self.config = cfg = config
        E, D = cfg.input_dim, cfg.latent_dim
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, E)
        self.pos_embeddings = nn.ModuleList()
        if cfg.position_encoding == "absolute":
            for size in cfg.position_table_sizes:
                table = nn.Embedding(size, E)
                if cfg.absolute_table == "sinusoidal":
                    table.weight.requires_grad_(False)
                self.pos_embeddings.append(table)
        self.latent_init = nn.Linear(E, D)  # z0 = Linear(emb at the latent's input)
        self.cross_attend = CrossAttend(cfg)
        self.latent_layers = nn.ModuleList(LatentLayer(cfg) for _ in range(cfg.num_latent_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.output = nn.Linear(D, cfg.vocab_size)
        self.init_weights()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The official initialisation.

        Embeddings: truncated normal, std 1 (cut at 2 std). Every Linear:
        fan-in variance scaling with a truncated normal (scale 1), bias 0.
        The logits layer starts at zero unless ``final_layer_init_zeros`` is off.
        LayerNorms: scale 1, offset 0.
        """
        cfg = self.config
        nn.init.trunc_normal_(self.tok_embeddings.weight, std=1.0, a=-2.0, b=2.0, generator=generator)
        for table in self.pos_embeddings:
            if cfg.absolute_table == "sinusoidal":
                table.weight.copy_(sinusoidal_table(table.num_embeddings, cfg.input_dim))
            else:
                nn.init.trunc_normal_(table.weight, std=1.0, a=-2.0, b=2.0, generator=generator)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # Variance scaling divides by the std of a unit normal cut at
                # +-2 so the truncated draw keeps variance 1 / fan_in.
                std = math.sqrt(1.0 / module.in_features) / 0.87962566103423978
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std, generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if cfg.final_layer_init_zeros:
            nn.init.zeros_(self.output.weight)

    # --------------------------------------------------------------- forward

    def embed(self, inputs: Tensor, positions: Tensor) -> Tensor:
        """Token embedding, plus the summed position tables when absolute. [B, T, E]."""
        emb = self.tok_embeddings(inputs)
        if self.config.position_encoding == "absolute":
            idx = positions if positions.dim() == 3 else positions[..., None]
            for axis, table in enumerate(self.pos_embeddings):
                emb = emb + table(idx[..., axis])
        return emb

    def _check_inputs(self, inputs: Tensor, positions: Tensor | None, num_latents: int) -> None:
        cfg = self.config
        if inputs.dim() != 2:
            raise ValueError(f"inputs must be [batch, length] token ids, got shape {tuple(inputs.shape)}")
        if inputs.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"inputs must be integer token ids, got {inputs.dtype}")
        B, T = inputs.shape
        if T < 1:
            raise ValueError("inputs must hold at least one token")
        if T > cfg.context_len:
            raise ValueError(
                f"input length {T} exceeds context_len {cfg.context_len}: crop the input to its "
                "last context_len tokens or build the model with a longer context_len"
            )
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        lo, hi = int(inputs.min()), int(inputs.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {cfg.vocab_size}) for vocab_size {cfg.vocab_size}, "
                f"got ids from {lo} to {hi}"
            )
        if positions is None:
            return
        n_axes = len(self.pos_embeddings) if cfg.position_encoding == "absolute" else 1
        ok_shape = positions.shape == (B, T) or (positions.dim() == 3 and positions.shape[:2] == (B, T))
        if not ok_shape:
            raise ValueError(
                f"positions must be [B, T] or [B, T, axes] like inputs {tuple(inputs.shape)}, "
                f"got {tuple(positions.shape)}"
            )
        axes = 1 if positions.dim() == 2 else positions.shape[2]
        if axes != n_axes:
            raise ValueError(f"positions have {axes} index axes but the model expects {n_axes}")
        if cfg.position_encoding == "absolute":
            idx = positions if positions.dim() == 3 else positions[..., None]
            for axis, size in enumerate(cfg.position_table_sizes):
                hi = int(idx[..., axis].max())
                if hi >= size or int(idx[..., axis].min()) < 0:
                    raise ValueError(
                        f"position {hi} on axis {axis} is outside the position table of "
                        f"{size} rows: raise position_table_sizes or use rotary positions"
                    )

    def forward(
        self,
        inputs: Tensor,
        positions: Tensor | None = None,
        num_latents: int | None = None,
        cache: KVCache | None = None,
    ) -> PerceiverAROutput:
        """Logits of the M latents for a right-padded batch.

        inputs [B, T] token ids (PAD = 0 only as trailing padding).
        positions [B, T] (or [B, T, axes] for several absolute tables),
        1-based, 0 on padding; defaults to 1..length.
        num_latents overrides the config's M for this call; M = T gives a
        decoder-only Transformer. Each latent predicts the token after its input.

        cache (generation only, see perceiver_ar.generate): an empty cache is
        filled with the keys/values of this forward (the prime or a reset); a
        filled one makes this call one decode step (``decode_step``).
        """
        if cache is not None:
            if self.training:
                raise ValueError("cached generation needs model.eval(): dropout would corrupt the cache")
            if cache.num_inputs > 0:
                return self.decode_step(inputs, positions, cache)
            if not bool((inputs != PAD_ID).all()):
                raise ValueError("a cache can only be filled from inputs without padding")
        cfg = self.config
        M = cfg.num_latents if num_latents is None else int(num_latents)
        self._check_inputs(inputs, positions, M)
        inputs = inputs.long()
        B, T = inputs.shape
        M = min(M, T)
        if positions is None:
            positions = default_positions(inputs)
        emb = self.embed(inputs, positions)  # [B, T, E]
        rot_pos = positions if positions.dim() == 2 else positions[..., 0]

        # Cross-attend dropout (training only): hide a random subset of inputs
        # from every latent and head, never a latent's own input.
        input_keep = None
        kept_index = None
        p = cfg.cross_attend_dropout
        if self.training and p > 0:
            if cfg.cross_attend_dropout_mode == "drop":
                inputs, emb, rot_pos, kept_index = drop_prefix_inputs(inputs, emb, rot_pos, M, p)
                T = inputs.shape[1]
            else:
                input_keep = torch.rand(B, T, device=inputs.device) >= p

        lengths = sequence_lengths(inputs)
        latent_index = latent_indices(lengths, M)  # [B, M]
        masks = build_masks(inputs, latent_index, input_keep)
        if self.training and cfg.latent_dropout > 0:
            masks = with_latent_dropout(masks, latent_index, cfg.latent_dropout)

        gather = (latent_index % T)[..., None]  # -1 wraps to T-1, as in the official code
        z0 = self.latent_init(emb.gather(1, gather.expand(B, M, emb.shape[-1])))  # [B, M, D]

        rope_cross_q = rope_cross_k = rope_latent = None
        if cfg.position_encoding == "rotary":
            latent_pos = rot_pos.gather(1, gather[..., 0])  # [B, M]
            rope_cross_q = rotary_tables(latent_pos, cfg.cross_attend_rotary_dim, cfg.max_wavelength)
            rope_cross_k = rotary_tables(rot_pos, cfg.cross_attend_rotary_dim, cfg.max_wavelength)
            rope_latent = rotary_tables(latent_pos, cfg.latent_rotary_dim, cfg.max_wavelength)

        if cfg.checkpoint_cross_attend and self.training:
            z = checkpoint(self.cross_attend, z0, emb, masks, rope_cross_q, rope_cross_k, use_reentrant=False)
        else:
            cross_cache = None if cache is None else cache.cross
            z = self.cross_attend(z0, emb, masks, rope_cross_q, rope_cross_k, cross_cache)
        for i, layer in enumerate(self.latent_layers):
            if cfg.checkpoint_latent_layers and self.training:
                z = checkpoint(layer, z, masks, rope_latent, use_reentrant=False)
            else:
                z = layer(z, masks, rope_latent, None if cache is None else cache.latent[i])
        logits = self.output(self.norm(z))  # [B, M, V]

        if kept_index is not None:
            # Report latents in the coordinates of the caller's inputs.
            latent_index = torch.where(
                latent_index >= 0, kept_index.gather(1, latent_index.clamp(min=0)), latent_index
            )
        return PerceiverAROutput(logits=logits, latent_index=latent_index)

    def decode_step(self, inputs: Tensor, positions: Tensor, cache: KVCache) -> PerceiverAROutput:
        """One generation step: the new input hosts one new latent. Logits [B, 1, V].

        inputs [B, 1] is the token just sampled and positions [B, 1] its
        position. Its keys/values join the cross-attend cache and the latent's
        join each latent layer's cache; the latent attends to everything cached
        (all of it precedes it), so no mask is built. Token ids are not range
        checked here: that would cost a device sync per token.
        """
        cfg = self.config
        B = cache.batch_size
        if inputs.shape != (B, 1) or positions is None or positions.shape[:2] != (B, 1):
            raise ValueError(
                f"a cached step takes one new token [{B}, 1] and its position [{B}, 1], "
                f"got {tuple(inputs.shape)} and {None if positions is None else tuple(positions.shape)}"
            )
        emb = self.embed(inputs, positions)  # [B, 1, E]
        z0 = self.latent_init(emb)  # [B, 1, D]
        rope_cross = rope_latent = None
        if cfg.position_encoding == "rotary":
            rot_pos = positions if positions.dim() == 2 else positions[..., 0]
            rope_cross = rotary_tables(rot_pos, cfg.cross_attend_rotary_dim, cfg.max_wavelength)
            rope_latent = rope_cross
            if cfg.latent_rotary_dim != cfg.cross_attend_rotary_dim:
                rope_latent = rotary_tables(rot_pos, cfg.latent_rotary_dim, cfg.max_wavelength)
        see_all = Masks(cross=None, latent=None, latent_causal=False, uniform_rows=None)
        z = self.cross_attend(z0, emb, see_all, rope_cross, rope_cross, cache.cross)
        for layer, layer_cache in zip(self.latent_layers, cache.latent, strict=True):
            z = layer(z, see_all, rope_latent, layer_cache)
        logits = self.output(self.norm(z))  # [B, 1, V]
        return PerceiverAROutput(logits=logits, latent_index=torch.zeros_like(inputs))

    # ------------------------------------------------------------ save/load

    def save_pretrained(self, directory: str) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        from .checkpoint import save_model

        save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str | torch.device = "cpu") -> PerceiverAR:
        """Rebuild a model from a directory written by ``save_pretrained``."""
        from .checkpoint import load_model

        return load_model(directory, map_location=map_location)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def drop_prefix_inputs(
    inputs: Tensor, emb: Tensor, positions: Tensor, num_latents: int, rate: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compute-saving cross-attend dropout: physically remove random prefix inputs.

    The inputs hosting latents (the last M valid ones of each row) are always
    kept; of the inputs before them a random (1 - rate) share survives, in
    order, and padding sorts to the end. Returns the shortened inputs,
    embeddings, positions and the original index of each kept input.
    """
    B, T = inputs.shape
    num_prefix = max(T - num_latents, 0)
    keep = num_latents + int(round((1.0 - rate) * num_prefix))
    if keep >= T:
        idx = torch.arange(T, device=inputs.device).expand(B, T)
        return inputs, emb, positions, idx
    lengths = sequence_lengths(inputs)
    j = torch.arange(T, device=inputs.device)
    priority = torch.rand(B, T, device=inputs.device)  # prefix inputs: random in [0, 1)
    priority = torch.where(j >= (lengths[:, None] - num_latents), 2.0, priority)  # latent inputs
    priority = torch.where(inputs == PAD_ID, -1.0, priority)  # padding last
    kept = priority.topk(keep, dim=1).indices.sort(dim=1).values  # [B, keep]
    # Padding picked to fill a short row sits after the row's valid inputs,
    # so the kept row is still right-padded.
    new_emb = emb.gather(1, kept[..., None].expand(B, keep, emb.shape[-1]))
    return inputs.gather(1, kept), new_emb, positions.gather(1, kept), kept


def with_latent_dropout(masks: Masks, latent_index: Tensor, rate: float) -> Masks:
    """Hide a random subset of latents as keys in the latent layers (diagonal kept)."""
    B, M = latent_index.shape
    latent = masks.latent
    if latent is None:  # rebuild the plain causal mask
        i = torch.arange(M, device=latent_index.device)
        latent = (i[:, None] >= i[None, :]).expand(B, 1, M, M)
    keep = torch.rand(B, M, device=latent_index.device) >= rate
    eye = torch.eye(M, dtype=torch.bool, device=latent_index.device)
    latent = (latent & keep[:, None, None, :]) | eye
    return Masks(
        cross=masks.cross,
        latent=latent,
        latent_causal=False,
        uniform_rows=masks.uniform_rows,
        cross_band=masks.cross_band,
    )
