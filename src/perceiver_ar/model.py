"""The Perceiver AR model (Hawthorne, Jaegle et al., ICML 2022).

A long input of T <= N tokens is embedded once; the last M valid inputs host
the latents. One causally masked cross-attend lets every latent read the
inputs up to its own, then L causal self-attention layers run over the M
latents only, and each latent predicts the token after its input.

This file holds only modules; masks, rotary and kernels live in
``attention.py``. It computes exactly what the official JAX/Haiku
implementation computes (tests/golden/README.md maps every parameter).
Shape letters: B batch, T inputs, M latents, H heads, E input width,
D latent width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import (
    KVBuffer,
    Masks,
    ModelCache,
    build_masks,
    default_positions,
    latent_indices,
    scaled_dot_product,
    sequence_lengths,
    sinusoidal_table,
    with_latent_dropout,
)
from .checkpoint import Pretrained
from .config import PerceiverARConfig
from .rotary import apply_rotary, apply_rotary_, rope
from .validation import check_cache_fill, check_inputs
from .vocab import PAD_ID

# cos, sin [B, 1, T, rotary_dim / 2] and the same as unit complex numbers (None under torch.compile)
Rope = tuple[Tensor, Tensor, Tensor | None]


def squared_relu(x: Tensor) -> Tensor:
    return F.relu(x).square() if torch.compiler.is_compiling() else _SquaredReLU.apply(x)


class _SquaredReLU(torch.autograd.Function):
    """relu(x)^2 whose backward is two operations, 2 relu(x) * grad (autograd's pow and relu take four).

    Eager only: under torch.compile the plain form is traced and fused.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        return torch.mul(grad, r).mul_(2.0)


def gelu_tanh(x: Tensor) -> Tensor:
    # jax.nn.gelu defaults to the tanh approximation.
    return F.gelu(x, approximate="tanh")


ACTIVATION_FNS = {"sq_relu": squared_relu, "gelu": gelu_tanh}


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in fp32 and returned in the input's dtype.

    In a model cast to bf16 or fp16 (and under autocast, which on CPU runs
    layer_norm in whatever dtype it gets) the statistics, the scale and the
    offset are then applied in fp32 and rounded once. In fp32 it is exactly
    ``nn.LayerNorm``; the parameters are the same, so are the checkpoints.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # no casts
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


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

    def queries(self, x_q: Tensor, rope: Rope | None) -> Tensor:
        q = self.split_heads(self.wq(x_q))
        return q if rope is None else apply_rotary(q, *rope)

    def keys_values(self, x_kv: Tensor, rope: Rope | None) -> tuple[Tensor, Tensor]:
        """Projected keys (rotated) and values, [B, H, T, dh] each."""
        k = self.split_heads(self.wk(x_kv))
        v = self.split_heads(self.wv(x_kv))
        if rope is None:
            return k, v
        rotate = apply_rotary_ if not (torch.is_grad_enabled() and k.requires_grad) else apply_rotary
        return rotate(k, *rope), v

    def output(self, out: Tensor) -> Tensor:
        """[B, H, Lq, dh] attention output -> [B, Lq, out_dim] through the output projection."""
        return self.wo(out.transpose(1, 2).flatten(2))


def attend_to_cache(
    cache: KVBuffer | None, k: Tensor, v: Tensor, num_queries: int, decode: bool, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The keys, values and mask an attention reads: its own, or its cache's once they are stored.

    A block into an empty cache (the prime, a full reset) attends to itself
    as a forward does; a decode step attends to the whole preallocated buffer
    through the cache's mask of valid, visible slots.
    """
    if cache is None:
        return k, v, mask
    if decode:
        return cache.extend(k, v, num_queries)
    k, v = cache.update(k, v)
    return k, v, mask


class CrossAttend(nn.Module):
    """Latents (D wide) read the embedded inputs (E wide), with a query residual."""

    def __init__(self, cfg: PerceiverARConfig):
        super().__init__()
        E, D = cfg.input_dim, cfg.latent_dim
        self.chunk_size = cfg.cross_attend_chunk_size
        self.query_norm = LayerNorm(D, eps=cfg.layer_norm_eps)
        self.kv_norm = LayerNorm(E, eps=cfg.layer_norm_eps)
        self.attention = Attention(D, E, E, D, cfg.cross_attend_heads)
        self.ffn_norm = LayerNorm(D, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(D, cfg.cross_attend_widening, cfg.activation, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def project(
        self, z0: Tensor, emb: Tensor, rope_q: Rope | None, rope_k: Rope | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The latents' queries [B, H, M, E/H] and the inputs' keys and values [B, H, T, E/H].

        Separate from ``forward`` so that ``perceiver_ar.attention_maps``
        recomputes the attention weights from exactly the q and k the forward uses.
        """
        q = self.attention.queries(self.query_norm(z0), rope_q)
        k, v = self.attention.keys_values(self.kv_norm(emb), rope_k)
        return q, k, v

    def forward(
        self,
        z0: Tensor,
        emb: Tensor,
        masks: Masks,
        rope_q: Rope | None,
        rope_k: Rope | None,
        cache: KVBuffer | None = None,
    ) -> Tensor:
        q, k, v = self.project(z0, emb, rope_q, rope_k)  # [B, H, M, E/H], [B, H, T, E/H] x 2
        k, v, mask = attend_to_cache(cache, k, v, q.shape[2], masks.decode, masks.cross)
        if masks.cross_kernel is not None:  # context parallelism: this rank's keys, merged across ranks
            out = masks.cross_kernel(q, k, v)
        else:
            out = scaled_dot_product(
                q,
                k,
                v,
                mask=mask,
                causal=masks.full_rows,
                uniform_rows=masks.uniform_rows,
                chunk_size=self.chunk_size,
            )
        z = z0 + self.dropout(self.attention.output(out))
        return z + self.feed_forward(self.ffn_norm(z))


class LatentLayer(nn.Module):
    """Pre-LN causal self-attention and MLP over the latents."""

    def __init__(self, cfg: PerceiverARConfig):
        super().__init__()
        D = cfg.latent_dim
        self.attention_norm = LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attention = Attention(D, D, D, D, cfg.latent_heads)
        self.ffn_norm = LayerNorm(D, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(D, cfg.latent_widening, cfg.activation, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, z: Tensor, masks: Masks, rope: Rope | None, cache: KVBuffer | None = None) -> Tensor:
        h = self.attention_norm(z)
        q = self.attention.queries(h, rope)
        k, v = self.attention.keys_values(h, rope)
        # With a cache: this layer's latents so far, the new ones last.
        k, v, mask = attend_to_cache(cache, k, v, q.shape[2], masks.decode, masks.latent)
        causal = masks.full_rows and mask is None
        out = scaled_dot_product(q, k, v, mask=mask, causal=causal)
        z = z + self.dropout(self.attention.output(out))
        return z + self.feed_forward(self.ffn_norm(z))


@dataclass
class PerceiverAROutput:
    logits: Tensor  # [B, M, V]
    latent_index: Tensor  # [B, M] input index of each latent, -1 if invalid


@dataclass
class LatentRopes:
    """Rotary tables of one forward: cross-attend queries and keys, latent layers."""

    cross_q: Rope | None = None
    cross_k: Rope | None = None
    latent: Rope | None = None


class PerceiverAR(Pretrained, nn.Module):
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
        self.norm = LayerNorm(D, eps=cfg.layer_norm_eps)
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

    def forward(
        self,
        inputs: Tensor,
        positions: Tensor | None = None,
        num_latents: int | None = None,
        cache: ModelCache | None = None,
        *,
        full_rows: bool | None = None,
        validate: bool = True,
    ) -> PerceiverAROutput:
        """Logits of the M latents for a right-padded batch.

        inputs [B, T] token ids (PAD = 0 only as trailing padding).
        positions [B, T] (or [B, T, axes] for several absolute tables),
        1-based, 0 on padding; defaults to 1..length.
        num_latents overrides the config's M for this call; M = T gives a
        decoder-only Transformer. Each latent predicts the token after its input.
        cache (generation only, see perceiver_ar.generate): an empty cache is
        filled with the keys/values of this forward (the prime or a reset);
        later tokens go through ``decode_step``.

        full_rows: True when the caller knows no row has padding, so the
        mask-free full-row kernels run; False builds the masks (right for any
        batch); None (default) reads the inputs to decide, a host sync that is
        skipped under ``torch.compile``, where None means False.
        validate: run ``check_inputs`` first (default). It reads tensor values,
        a host sync per call on a GPU and a graph break under compile, so
        trusted callers that check their data where it enters (the trainer,
        the evaluator, the generator) pass False; it never runs while compiling.
        """
        if validate and not torch.compiler.is_compiling():
            M = self.check_inputs(inputs, positions, num_latents)  # refuses 2.5, 0, > N
            if cache is not None:
                check_cache_fill(inputs, self.training)
            if full_rows and not bool((inputs != PAD_ID).all()):
                raise ValueError("full_rows=True but the inputs hold padding: pass full_rows=None or False")
        else:
            M = self.config.num_latents if num_latents is None else int(num_latents)
        if full_rows is None and not torch.compiler.is_compiling():
            full_rows = bool((inputs != PAD_ID).all())
        inputs = inputs.long()
        M = min(M, inputs.shape[1])
        positions = default_positions(inputs) if positions is None else positions
        emb = self.embed(inputs, positions)  # [B, T, E]
        rot_pos = positions if positions.dim() == 2 else positions[..., 0]  # [B, T]

        # Cross-attend dropout (training only): hide a random subset of inputs
        # from every latent and head, never a latent's own input.
        input_keep = kept_index = None
        if self.training and self.config.cross_attend_dropout > 0:
            inputs, emb, rot_pos, input_keep, kept_index = self.cross_attend_dropout(inputs, emb, rot_pos, M)

        B, T = inputs.shape
        if full_rows:  # every row holds T inputs: the latents sit on the last M, a slice
            latent_index = torch.arange(T - M, T, device=inputs.device).expand(B, M)
            z0 = self.latent_init(emb[:, T - M :])  # [B, M, D]
            ropes = self.rotary(rot_pos if M == T else rot_pos[:, T - M :], rot_pos)
        else:
            latent_index = latent_indices(sequence_lengths(inputs), M)  # [B, M]
            gather = latent_index % T  # -1 wraps to T-1, as in the official code
            z0 = self.latent_init(emb.gather(1, gather[..., None].expand(-1, -1, emb.shape[-1])))  # [B, M, D]
            ropes = self.rotary(rot_pos.gather(1, gather), rot_pos)
        masks = build_masks(inputs, latent_index, input_keep, full_rows=bool(full_rows))
        if self.training and self.config.latent_dropout > 0:
            masks = with_latent_dropout(masks, latent_index, self.config.latent_dropout)
        logits = self.trunk(z0, emb, masks, ropes, cache)  # [B, M, V]

        if kept_index is not None:  # report latents in the coordinates of the caller's inputs
            latent_index = torch.where(
                latent_index >= 0, kept_index.gather(1, latent_index.clamp(min=0)), latent_index
            )
        return PerceiverAROutput(logits=logits, latent_index=latent_index)

    def decode_step(self, inputs: Tensor, positions: Tensor, cache: ModelCache) -> PerceiverAROutput:
        """A cached generation step: the newest Q inputs host Q new latents. Logits [B, Q, V].

        inputs [B, Q] and positions [B, Q] (or [B, Q, axes]) are the last Q
        inputs of the window. Only the newest, the token just sampled, is new
        to the cross-attend cache: its keys/values join it. The Q latents
        attend to the cached inputs up to their own and join each latent
        layer's cache. Q = 1 is the ordinary step; a reset that reuses the
        window's cached keys and values empties the latent caches and takes
        the ``reset_fill`` newest inputs at once. Each attention reads its
        whole preallocated cache through the cache's mask, so every step has
        the same shapes (one compiled graph, no host sync). Token ids are not
        range checked here: that would cost a device sync per token.
        """
        if self.training:
            raise ValueError("cached generation needs model.eval(): dropout would corrupt the cache")
        B, Q = inputs.shape[0], inputs.shape[-1]
        if inputs.dim() != 2 or Q < 1 or positions.shape[:2] != (B, Q):
            raise ValueError(
                f"a cached step takes the newest tokens [B, Q] and their positions [B, Q], "
                f"got {tuple(inputs.shape)} and {tuple(positions.shape)}"
            )
        emb = self.embed(inputs, positions)  # [B, Q, E]
        rot_pos = positions if positions.dim() == 2 else positions[..., 0]  # [B, Q]
        newest = rot_pos if Q == 1 else rot_pos[:, -1:]  # the one input new to the cross-attend cache
        masks = Masks(decode=True)
        logits = self.trunk(self.latent_init(emb), emb[:, -1:], masks, self.rotary(rot_pos, newest), cache)
        return PerceiverAROutput(logits=logits, latent_index=torch.zeros_like(inputs))

    # ----------------------------------------------------------- its pieces

    def embed(self, inputs: Tensor, positions: Tensor) -> Tensor:
        """Token embedding, plus the summed position tables when absolute. [B, T, E]."""
        emb = self.tok_embeddings(inputs)
        if self.config.position_encoding == "absolute":
            idx = positions if positions.dim() == 3 else positions[..., None]
            for axis, table in enumerate(self.pos_embeddings):
                emb = emb + table(idx[..., axis])
        return emb

    def rotary(self, latent_pos: Tensor, input_pos: Tensor, widen: bool = True) -> LatentRopes:
        """Rotary tables for latents at ``latent_pos`` [B, M] reading inputs at ``input_pos`` [B, T].

        The phases come widened to each attention's head width (``full_phase``)
        for ``apply_rotary``; ``widen=False`` keeps them as narrow as the rotated
        channels, for a caller that only rotates in place (``apply_rotary_``).
        """
        cfg = self.config
        if cfg.position_encoding != "rotary":
            return LatentRopes()
        cross_width = cfg.cross_attend_head_dim if widen else None
        latent_width = cfg.latent_head_dim if widen else None
        cross = (cfg.cross_attend_rotary_dim, cfg.max_wavelength, cross_width)
        latent = (cfg.latent_rotary_dim, cfg.max_wavelength, latent_width)
        cross_q = rope(latent_pos, *cross)
        cross_k = cross_q if input_pos is latent_pos else rope(input_pos, *cross)
        return LatentRopes(cross_q, cross_k, cross_q if latent == cross else rope(latent_pos, *latent))

    def trunk(
        self, z0: Tensor, emb: Tensor, masks: Masks, ropes: LatentRopes, cache: ModelCache | None
    ) -> Tensor:
        """Cross-attend, the latent layers and the logits layer. [B, M, V]."""
        cfg = self.config
        if cfg.checkpoint_cross_attend and self.training:
            z = checkpoint(
                self.cross_attend, z0, emb, masks, ropes.cross_q, ropes.cross_k, use_reentrant=False
            )
        else:
            z = self.cross_attend(
                z0, emb, masks, ropes.cross_q, ropes.cross_k, None if cache is None else cache.cross
            )
        for i, layer in enumerate(self.latent_layers):
            if cfg.checkpoint_latent_layers and self.training:
                z = checkpoint(layer, z, masks, ropes.latent, use_reentrant=False)
            else:
                z = layer(z, masks, ropes.latent, None if cache is None else cache.latent[i])
        return self.output(self.norm(z))

    def cross_attend_dropout(
        self, inputs: Tensor, emb: Tensor, rot_pos: Tensor, num_latents: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """The configured form of cross-attend dropout.

        "drop" removes inputs (returns the shortened inputs, embeddings,
        positions and the kept inputs' original indices); "mask" keeps them
        and returns which inputs stay visible [B, T]. ``emb`` may be any
        per-input features [B, T, C]: context parallelism passes positions,
        since each rank embeds only its slice of the inputs after the drop.
        """
        rate = self.config.cross_attend_dropout
        if self.config.cross_attend_dropout_mode == "drop":
            inputs, emb, rot_pos, kept_index = drop_prefix_inputs(inputs, emb, rot_pos, num_latents, rate)
            return inputs, emb, rot_pos, None, kept_index
        input_keep = torch.rand(inputs.shape, device=inputs.device) >= rate
        return inputs, emb, rot_pos, input_keep, None

    def check_inputs(
        self, inputs: Tensor, positions: Tensor | None = None, num_latents: int | None = None
    ) -> int:
        """Raise ValueError, naming the fix, for inputs this model cannot take; returns M for the call.

        See ``validation.check_inputs``: one host sync (a GPU waits for it).
        """
        return check_inputs(self.config, self.tok_embeddings.weight.device, inputs, positions, num_latents)

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
