"""Attention machinery below the model: positions, masks, kernels, the cache protocol (rotary: rotary.py).

Everything here is a function of tensors; the modules live in ``model.py``.
``scaled_dot_product`` is the one place that chooses an attention kernel.
Masks are built once per forward from absolute indices (``build_masks``) and
passed down. Shape letters: B batch, T inputs, M latents, H heads, dh head width.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .vocab import PAD_ID

# Query-chunk size of a masked attention when autograd is off and the caller sets none.
INFERENCE_CHUNK = 128
AUTO_CHUNK_AREA = 1 << 20  # masks of more query x key entries than this are chunked


# ----------------------------------------------------------------------------
# The KV cache protocol (implemented by perceiver_ar.kv_cache)
# ----------------------------------------------------------------------------


class KVBuffer(Protocol):
    """Keys and values of one attention layer kept across generation steps."""

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values [B, H, T, dh]; return every cached one to attend to."""
        ...

    def extend(self, k: Tensor, v: Tensor, num_queries: int) -> tuple[Tensor, Tensor, Tensor]:
        """A decode step: store new keys/values; return the whole buffers and what each query sees."""
        ...


class ModelCache(Protocol):
    """What the model reads and writes during cached generation: one buffer per attention."""

    cross: KVBuffer
    latent: Sequence[KVBuffer]


# ----------------------------------------------------------------------------
# Positions
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
# Masks
# ----------------------------------------------------------------------------


@dataclass
class CrossMask:
    """Which inputs each latent reads, as indices: never an [M, T] mask until a kernel asks for one.

    Query i sees key j iff j <= last[b, i] and, with the mask form of
    cross-attend dropout, keep[b, j] or j == last[b, i] (a latent always
    sees its own input). A latent sits on a valid input and padding only
    follows a row's inputs, so every key up to ``last`` is a valid input.
    """

    last: Tensor  # [B, Lq] index of the last visible key
    keep: Tensor | None = None  # [B, Lk] inputs kept by cross-attend dropout

    def dense(self, num_keys: int, rows: slice = slice(None)) -> Tensor:
        """The boolean mask of query ``rows`` (True = attend), [B, 1, rows, num_keys]."""
        last = self.last[:, rows, None]  # [B, q, 1]
        j = torch.arange(num_keys, device=last.device)
        mask = j <= last
        if self.keep is not None:
            mask = mask & (self.keep[:, None, :] | (j == last))
        return mask.unsqueeze(1)


@dataclass
class Masks:
    """What each attention may see, built once per forward.

    ``full_rows``: no row has padding and every input is visible, so no mask
    is built: the cross-attend is bottom-right causal (every latent sees all
    inputs up to its own) and the latent layers are plainly causal. Otherwise
    ``cross`` describes the cross-attend's visibility by indices (the kernel
    builds a mask only where it needs one) and ``latent`` holds the latent
    layers' boolean mask (True = attend); both ``None`` with ``full_rows``
    off means every key is visible. ``decode``: a cached decode step (each
    layer's cache says which slots the new queries see, ``KVBuffer.extend``).
    ``cross_kernel`` replaces the cross-attend's kernel: context parallelism
    passes one that attends to this rank's keys and merges the ranks' results.
    """

    cross: CrossMask | None = None
    latent: Tensor | None = None  # [B, 1, M, M]
    full_rows: bool = False
    decode: bool = False
    # Latents with no visible input; the official code gives them a uniform
    # softmax over all T inputs (scores filled with -1e30). [B, M] or None.
    uniform_rows: Tensor | None = None
    cross_kernel: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None  # (q, k, v) -> out


def build_masks(inputs: Tensor, latent_index: Tensor, input_keep: Tensor | None, full_rows: bool) -> Masks:
    """Masks of the official ``final_block`` style.

    A latent on input s sees input j iff j <= s and x[j] != PAD (and, with the
    mask form of cross-attend dropout, j was kept or j == s). Latents see
    latents on the same or earlier inputs; invalid latents (-1) are hidden as
    keys and see only themselves.

    ``full_rows``: the caller knows no row has padding (the forward decides
    it from its caller or once from the inputs). Nothing here reads tensor
    values, so building masks never waits for the device.
    """
    B, T = inputs.shape
    M = latent_index.shape[1]
    if input_keep is None and T >= M and full_rows:
        return Masks(full_rows=True)
    valid = latent_index >= 0
    # An invalid latent has no visible input. A kernel would return NaN for
    # a row with nothing to see, so let it see every key here and overwrite
    # its output with the uniform mean afterwards (what a -1e30 fill
    # produces). Without reading values it is not known whether a row is
    # short, so this is done always, unless the rows are full (then no
    # latent is invalid).
    last, uniform_rows = latent_index, None
    if not full_rows:
        last = torch.where(valid, latent_index, T - 1)
        uniform_rows = ~valid
    latent = (latent_index[:, :, None] >= latent_index[:, None, :]) & valid[:, None, :]
    latent = latent | torch.eye(M, dtype=torch.bool, device=inputs.device)
    return Masks(cross=CrossMask(last, input_keep), latent=latent.unsqueeze(1), uniform_rows=uniform_rows)


def band_mask(num_queries: int, num_keys: int, device: torch.device) -> Tensor:
    """The bottom-right causal mask: query m sees keys 0..num_keys - num_queries + m. [1, 1, Lq, Lk]."""
    j = torch.arange(num_keys, device=device)
    last = torch.arange(num_keys - num_queries, num_keys, device=device)
    return (j[None, :] <= last[:, None])[None, None]


def with_latent_dropout(masks: Masks, latent_index: Tensor, rate: float) -> Masks:
    """Hide a random subset of latents as keys in the latent layers (diagonal kept)."""
    B, M = latent_index.shape
    latent = masks.latent
    if latent is None:  # full rows: the plain causal mask
        i = torch.arange(M, device=latent_index.device)
        latent = (i[:, None] >= i[None, :]).expand(B, 1, M, M)
    keep = torch.rand(B, M, device=latent_index.device) >= rate
    eye = torch.eye(M, dtype=torch.bool, device=latent_index.device)
    return replace(masks, latent=(latent & keep[:, None, None, :]) | eye)


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


class PrefixCausalAttention(torch.autograd.Function):
    """SDPA of M queries on T keys: all T - M prefix keys, then the last M causally.

    Exactly ``softmax(q k^T + band mask) v`` for the full-row cross-attend,
    without the [M, T] mask: SDPA on CPU converts a boolean mask into a float
    copy four times its size in the forward and again in the backward, and
    cannot skip masked blocks. Here two fused CPU flash kernels run (the prefix
    unmasked, the last M keys with the square causal mask) and their outputs
    merge by log-sum-exp. The backward of a key block needs only the merged
    output and log-sum-exp, so it is exact too. q [B, H, M, dh], k and v
    [B, H, T, dh] with T > M, all in one dtype (fp32, bf16 or fp16); CPU only.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        P = k.shape[2] - q.shape[2]  # prefix inputs visible to every latent
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_prefix, lse_prefix = flash(q, k[:, :, :P], v[:, :, :P], 0.0, False)
        out_square, lse_square = flash(q, k[:, :, P:], v[:, :, P:], 0.0, True)
        # The kernels return the log-sum-exp in fp32 for every input dtype; the
        # merge runs in fp32 too and rounds once to q's dtype (a no-op in fp32).
        lse = torch.logaddexp(lse_prefix, lse_square)  # [B, H, M]
        out = torch.exp(lse_prefix - lse)[..., None] * out_prefix.to(lse.dtype)
        out.addcmul_(torch.exp(lse_square - lse)[..., None], out_square.to(lse.dtype))
        out = out.to(q.dtype)
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


# FlexAttention (torch >= 2.5) is the CUDA cross-attend; older torch keeps SDPA with a mask.
try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5
    BlockMask = flex_attention = None

FLEX_BLOCK = 128  # FlexAttention's block of queries and of keys
# Head widths the compiled flex kernels are built for; others use SDPA.
FLEX_HEAD_DIMS = (16, 32, 64, 128, 256)
# Compiled variants the flex kernel may keep. One process legitimately needs many:
# each mask function (full rows, padded rows, dropout) x grad mode x autocast x dtype.
# Past Dynamo's default limit (8) torch silently runs flex unfused, materialising every
# N x M score (seen on an H200: eager training 1.2-1.7x slower, 16.6x the memory at
# N = 131,072; docs/gpu.md).
FLEX_RECOMPILE_LIMIT = 64
_compiled_flex = None


def compile_with_budget(
    fn: Callable[..., Tensor], limit: int = FLEX_RECOMPILE_LIMIT, native: bool | None = None
) -> Callable[..., Tensor]:
    """``torch.compile(fn)`` that may keep ``limit`` compiled variants of ``fn``.

    Where torch.compile takes ``recompile_limit`` and ``isolate_recompiles``
    (torch 2.13), this compile gets its own limit and its own cache, apart from
    any other compile of ``fn`` in the process. Older torch counts variants per
    code object under one global limit: each call then runs with that limit
    raised (``with_recompile_budget``). ``native`` forces one way (tests).
    """
    if native is None:
        params = inspect.signature(torch.compile).parameters
        native = "recompile_limit" in params and "isolate_recompiles" in params
    if native:
        return torch.compile(fn, recompile_limit=limit, isolate_recompiles=True)
    return with_recompile_budget(torch.compile(fn), limit)


def with_recompile_budget(
    fn: Callable[..., Tensor], limit: int = FLEX_RECOMPILE_LIMIT
) -> Callable[..., Tensor]:
    """``fn`` called with Dynamo's recompile limit raised to at least ``limit`` (restored after each call).

    The patch is per thread where torch keeps its config patches in a context
    variable (2.13); on older torch it is process-wide while a call runs.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch

    def call(*args, **kwargs):
        with config.patch(**{name: max(getattr(config, name), limit)}):
            return fn(*args, **kwargs)

    return call


def use_flex(q: Tensor) -> bool:
    """Whether the cross-attend of ``q`` runs as FlexAttention: on CUDA, when torch has it.

    Why flex on CUDA (docs/gpu.md): one fused kernel covers full rows,
    padded rows and cross-attend dropout through a mask function of indices,
    never builds an N x M score or mask tensor, skips the key blocks a query
    block cannot see, and has a backward. Merging two SDPA calls by
    log-sum-exp, as ``PrefixCausalAttention`` does on the CPU, would cover
    full rows only and call private flash kernels whose signatures change
    between releases. Head widths the kernels are not built for fall back to
    SDPA with a boolean mask.
    """
    return q.device.type == "cuda" and flex_attention is not None and q.shape[-1] in FLEX_HEAD_DIMS


def flex_kernel():
    """``flex_attention`` compiled (eager flex computes the whole score matrix), once per process.

    Inside a graph that is itself being compiled (``train --compile``) the
    plain function is traced into that graph instead.
    """
    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = compile_with_budget(flex_attention)
    return _compiled_flex


def cross_block_mask(mask: CrossMask, num_keys: int, block: int | None = None) -> BlockMask:
    """The FlexAttention ``BlockMask`` of a ``CrossMask``, from the indices alone: O(M/128 x N/128).

    For each block of queries, the key blocks up to the one holding its
    largest ``last`` are visited; those wholly at or before its smallest
    ``last`` are full (no mask function evaluated), the rest partial. With
    cross-attend dropout every visited block is partial. ``last`` and
    ``keep`` are padded to whole blocks so the mask function never reads
    past them. ``block``: the block size (default ``FLEX_BLOCK``).
    """
    block = block or FLEX_BLOCK
    B, Lq = mask.last.shape
    nq, nk = -(-Lq // block), -(-num_keys // block)
    last = torch.cat((mask.last, mask.last[:, -1:].expand(B, nq * block - Lq)), dim=1)  # [B, nq * block]
    per_block = last.view(B, nq, block)
    lo, hi = per_block.min(dim=-1).values, per_block.max(dim=-1).values  # [B, nq]
    num_any = torch.div(hi, block, rounding_mode="floor") + 1  # key blocks 0 .. hi // block
    num_full = torch.div(lo + 1, block, rounding_mode="floor")  # key blocks that end at or before lo
    keep = None
    if mask.keep is not None:
        num_full = torch.zeros_like(num_full)
        keep = torch.cat((mask.keep, mask.keep.new_zeros(B, nk * block - num_keys)), dim=1)
    blocks = torch.arange(nk, device=last.device)
    partial_indices = (num_full[..., None] + blocks).clamp(max=nk - 1)  # the partial blocks, in order
    full_indices = blocks.expand(B, nq, nk)

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= last[b, q_idx]
        if keep is not None:
            visible = visible & (keep[b, kv_idx] | (kv_idx == last[b, q_idx]))
        return visible

    def table(t: Tensor) -> Tensor:
        return t.unsqueeze(1).to(torch.int32).contiguous()  # [B, 1 (heads), nq, ...]

    return BlockMask.from_kv_blocks(
        table(num_any - num_full),
        table(partial_indices),
        table(num_full),
        table(full_indices),
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(Lq, num_keys),
    )


def prefix_causal_block_mask(
    num_queries: int, num_keys: int, device: torch.device, block: int | None = None
) -> BlockMask:
    """The full-row cross-attend as a ``BlockMask`` shared by the batch: query i sees keys 0..Lk - Lq + i."""
    block = block or FLEX_BLOCK
    offset = num_keys - num_queries
    last = torch.arange(offset, num_keys, device=device)[None]
    tables = cross_block_mask(CrossMask(last), num_keys, block)

    def mask_mod(b, h, q_idx, kv_idx):  # no tensor to read: the same for every row
        return kv_idx <= q_idx + offset

    return BlockMask.from_kv_blocks(
        tables.kv_num_blocks,
        tables.kv_indices,
        tables.full_kv_num_blocks,
        tables.full_kv_indices,
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(num_queries, num_keys),
    )


def scaled_dot_product(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | CrossMask | None = None,
    causal: bool = False,
    uniform_rows: Tensor | None = None,
    chunk_size: int = 0,
) -> Tensor:
    """Attention of q [B, H, Lq, dh] on k, v [B, H, Lk, dh]; the one place a kernel is chosen.

    causal: bottom-right aligned (query i sees keys 0..Lk - Lq + i), for full
    rows; no mask is ever built for it on CPU or with FlexAttention. mask: a
    ``CrossMask`` (the cross-attend of padded rows or with dropout), a
    boolean [B or 1, 1, Lq, Lk], True = attend (the latent layers, a reset
    from the cache), or an additive float one in q's dtype, 0 or -inf (a
    decode step's cache slots). Neither: every key is visible. uniform_rows
    [B, Lq]: queries whose output is the mean of all values (latents with
    nothing to see). chunk_size: run masked SDPA in query chunks of this
    size (0: one chunk, or chunks of ``INFERENCE_CHUNK`` without autograd
    when the mask is large) to bound the mask, its float copy and workspace.

    The kernels: square causal (M = T, the latent layers) is SDPA
    ``is_causal``. The full-row cross-attend is ``PrefixCausalAttention`` on
    the CPU and FlexAttention on CUDA (``use_flex``); a ``CrossMask`` runs
    as FlexAttention on CUDA and as masked SDPA elsewhere. Returns [B, H, Lq, dh].
    """
    Lq, Lk = q.shape[2], k.shape[2]
    if causal:
        if Lq == Lk:  # decoder-only (M = T) and the latent layers: the square causal kernel
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if use_flex(q):
            return flex_kernel()(q, k, v, block_mask=prefix_causal_block_mask(Lq, Lk, q.device))
        if q.device.type == "cpu":  # two mask-free flash kernels merged by log-sum-exp
            return PrefixCausalAttention.apply(q, k, v)
        mask = band_mask(Lq, Lk, q.device)
    if isinstance(mask, CrossMask) and use_flex(q):
        out = flex_kernel()(q, k, v, block_mask=cross_block_mask(mask, Lk))
    else:
        out = masked_sdpa(q, k, v, mask, chunk_size)
    if uniform_rows is not None:
        out = torch.where(uniform_rows[:, None, :, None], v.mean(dim=2, keepdim=True), out)
    return out


def cross_visible(
    masks: Masks,
    num_queries: int,
    num_keys: int,
    rows: slice = slice(None),
    device: torch.device | None = None,
) -> Tensor:
    """Which keys the cross-attend queries ``rows`` see under ``masks``, as ``scaled_dot_product`` sees them.

    Boolean [B or 1, 1, rows, num_keys], True = attend. Full rows are the
    bottom-right causal band (query i sees keys 0..num_keys - num_queries + i);
    ``masks.cross`` is made dense; neither means every key (a cached decode
    step). Rows in ``masks.uniform_rows`` see nothing: their output is the mean
    of all values, so ``attention_weights`` gives them 1 / num_keys everywhere.
    For inspection (``perceiver_ar.attention_maps``): the kernels never build it.
    """
    if masks.full_rows:
        last = torch.arange(num_keys - num_queries, num_keys, device=device)[None]
        return CrossMask(last).dense(num_keys, rows)
    if masks.cross is not None:
        return masks.cross.dense(num_keys, rows)
    return torch.ones(1, 1, len(range(num_queries)[rows]), num_keys, dtype=torch.bool, device=device)


def attention_weights(q: Tensor, k: Tensor, visible: Tensor, uniform_rows: Tensor | None = None) -> Tensor:
    """The probabilities the kernels of ``scaled_dot_product`` apply to v, in fp32: [B, H, Lq, Lk].

    softmax(q k^T / sqrt(dh)) over the keys ``visible`` marks (SDPA's default
    scale, the one every kernel above uses), exactly 0 on the others; rows in
    ``uniform_rows`` [B, Lq] get 1 / Lk on every key (the mean the kernels
    return for a latent with nothing to see). For inspection: the caller
    bounds Lq so that the [Lq, Lk] scores fit.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    if uniform_rows is not None:
        weights = torch.where(uniform_rows[:, None, :, None], 1.0 / k.shape[2], weights)
    return weights


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | CrossMask | None, chunk_size: int) -> Tensor:
    """SDPA with a boolean or additive mask (a ``CrossMask`` is made dense one query chunk at a time)."""
    Lq, Lk = q.shape[2], k.shape[2]
    if mask is not None and chunk_size <= 0 and Lq * Lk > AUTO_CHUNK_AREA and not torch.is_grad_enabled():
        # SDPA on CPU turns a boolean mask into a float copy four times its
        # size (+512 MB for M = 1024, T = 131,072). Without autograd, query
        # chunks cost no time and bound that copy to chunk x T.
        chunk_size = INFERENCE_CHUNK
    if mask is None or chunk_size <= 0 or chunk_size >= Lq:
        dense = mask.dense(Lk) if isinstance(mask, CrossMask) else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    pieces = []
    for start in range(0, Lq, chunk_size):
        rows = slice(start, start + chunk_size)
        dense = mask.dense(Lk, rows) if isinstance(mask, CrossMask) else mask[:, :, rows]
        pieces.append(F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=dense))
    return torch.cat(pieces, dim=2)
