"""Context parallelism: the N inputs of each row split across the K processes of a group.

Who computes what, for each row (``ContextParallel``, applied to a model from
outside, as DDP is):

- every rank holds the whole row of token ids and positions (8 bytes each
  per input) and embeds only its contiguous slice of about N / K inputs,
  with the slice's own positions (absolute tables or rotary), then computes
  that slice's cross-attend keys and values (``kv_norm``, ``wk``, ``wv``,
  rotary on the keys): everything of size N lives on one rank only;
- every rank embeds the M inputs the latents sit on (an M-sized lookup: the
  latents' inputs may lie in any slice, so M larger than a slice is fine)
  and computes the same latent queries;
- each rank attends with the M queries to its own keys only, giving a
  partial output and its log-sum-exp per latent (masks by absolute input
  index; a latent that sees none of the slice's keys has lse = -inf), and
  the partials are merged exactly by log-sum-exp across the group (two
  all-reduces of M-sized tensors: the max of the lse, then the weighted
  outputs and weights), the merge ``PrefixCausalAttention`` does locally;
- the latent stack and the loss then run replicated on every rank of the
  group, identical (the same inputs, the same dropout seed): M-sized, so
  their memory does not grow with N, and no collective is needed to hand
  their result or their gradient from one rank to the others.

The backward is exact (``ContextParallelAttention``): the merged output is
replicated, so its gradient is the sum of the ranks' gradients (one
all-reduce, the collective matching the forward's); each rank then calls
the flash backward of each of its key blocks with the merged output and
log-sum-exp, which gives exactly the gradient of the full softmax for those
keys, and returns the queries' gradient from its keys only. Training scales
each rank's loss by 1 / K and sums every parameter gradient over the group
(DDP over the whole world does that; ``train.py``), so the gradients equal
one process's to float rounding (tests/test_context_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .attention import build_masks, default_positions, latent_indices, sequence_lengths, with_latent_dropout
from .model import PerceiverAR, PerceiverAROutput
from .vocab import PAD_ID

# Keys per kernel call. Where every latent sees every key (the prefix) the
# block bounds the extra copy of a block's key and value gradients; with a
# mask it bounds the float mask [B, 1, M, block] (8 MB per row at M = 1024).
# The portable kernel (any device but the CPU) holds [B, H, M, block] scores.
FULL_BLOCK = 1 << 15
MASKED_BLOCK = 1 << 11


def slice_bounds(length: int, size: int, rank: int) -> tuple[int, int]:
    """The inputs [start, end) of ``rank`` among ``size``: contiguous, as equal as possible."""
    return rank * length // size, (rank + 1) * length // size


@dataclass
class KeySlice:
    """What one rank's cross-attend needs to know of the row beyond its own keys.

    Latent i of row b sees input j iff j <= last[b, i] and, with the mask
    form of cross-attend dropout, keep[b, j] or j == last[b, i] (as
    ``CrossMask``); ``uniform_rows`` [B, M] marks latents with no input of
    their own (rows shorter than M), whose output is the mean of the values
    of all ``length`` inputs. ``lo``/``hi``: the smallest and largest entry
    of ``last`` (keys up to ``lo`` are seen by every latent, keys after
    ``hi`` by none).
    """

    last: Tensor  # [B, M] absolute index of the last input each latent sees
    start: int  # absolute index of this rank's first input
    length: int  # T, the inputs of the whole row
    lo: int
    hi: int
    keep: Tensor | None = None  # [B, T_r] this slice's inputs kept by cross-attend dropout
    uniform_rows: Tensor | None = None  # [B, M]
    group: dist.ProcessGroup | None = None
    full_block: int = FULL_BLOCK
    masked_block: int = MASKED_BLOCK
    portable: bool = False  # the portable kernel (any device) instead of the CPU flash kernels

    def blocks(self, num_keys: int) -> list[tuple[int, int, bool]]:
        """This rank's key blocks (local start, end, masked); keys nobody sees are skipped."""
        end = min(max(self.hi + 1 - self.start, 0), num_keys)
        full = 0 if self.keep is not None else min(max(self.lo + 1 - self.start, 0), end)
        step_full = self.masked_block if self.portable else self.full_block
        out = [(a, min(a + step_full, full), False) for a in range(0, full, step_full)]
        out += [(a, min(a + self.masked_block, end), True) for a in range(full, end, self.masked_block)]
        return out

    def mask(self, a: int, b: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The additive mask [B, 1, M, b - a] of local keys a..b and which latents see any of them [B, M]."""
        j = torch.arange(self.start + a, self.start + b, device=self.last.device)
        last = self.last[:, :, None]
        seen = j <= last  # [B, M, C]
        if self.keep is not None:
            seen = seen & (self.keep[:, None, a:b] | (j == last))
        mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))
        return mask.unsqueeze(1), seen.any(dim=-1)


def block_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, portable: bool
) -> tuple[Tensor, Tensor]:
    """Attention of q on one key block with its log-sum-exp: out [B, H, M, dh] (q's dtype), lse fp32."""
    if not portable:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(q, k, v, 0.0, False, attn_mask=mask)
    scores, lse = _scores(q, k, mask)
    probs = torch.exp(scores - _finite(lse)[..., None])
    return (probs @ v.float()).to(q.dtype), lse


def block_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    portable: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of one key block given the output and log-sum-exp merged over every key of the row.

    The softmax of the whole row restricted to this block is exp(s - lse):
    with the merged out and lse, the flash backward of a block is exact.
    """
    if not portable:
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        return backward(grad, q, k, v, out, lse, 0.0, False, attn_mask=mask)
    scale = q.shape[-1] ** -0.5
    probs = torch.exp(_scores(q, k, mask)[0] - _finite(lse)[..., None])  # [B, H, M, C]
    g = grad.float()
    dv = probs.transpose(-1, -2) @ g
    dscores = probs * (g @ v.float().transpose(-1, -2) - (g * out.float()).sum(-1, keepdim=True)) * scale
    dq, dk = dscores @ k.float(), dscores.transpose(-1, -2) @ q.float()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _scores(q: Tensor, k: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The portable kernel's fp32 scores [B, H, M, C] and their log-sum-exp [B, H, M]."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask.float()
    return scores, torch.logsumexp(scores, dim=-1)


def _finite(lse: Tensor) -> Tensor:
    """lse with -inf (nothing seen) replaced by 0, so exp(x - lse) gives 0 there, not NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def merge(out: Tensor, lse: Tensor, group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """Merge fp32 partial outputs [B, H, M, dh] and lse [B, H, M] across ``group`` by log-sum-exp."""
    if group is None or dist.get_world_size(group) == 1:
        return out, lse
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = _finite(top)
    weight = torch.exp(lse - top)  # 0 where this rank saw nothing
    packed = torch.cat((out * weight[..., None], weight[..., None]), dim=-1)
    dist.all_reduce(packed, group=group)
    total = packed[..., -1]
    merged = packed[..., :-1] / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]
    return merged, top + total.log()


class ContextParallelAttention(torch.autograd.Function):
    """The cross-attend of the M latent queries on the keys of every rank; this rank holds its own.

    q [B, H, M, dh] (the same on every rank), k and v [B, H, T_r, dh] (this
    rank's inputs). Returns the attention over all T inputs of the row,
    the same on every rank. Masks come from absolute input indices
    (``KeySlice``); CPU: the fused flash kernels, elsewhere a portable one.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, keys: KeySlice) -> Tensor:
        blocks = keys.blocks(k.shape[2])
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        with torch.autocast(q.device.type, enabled=False):
            for a, b, masked in blocks:
                mask, seen = keys.mask(a, b, q.dtype) if masked else (None, None)
                out_b, lse_b = block_forward(q, k[:, :, a:b], v[:, :, a:b], mask, keys.portable)
                if seen is not None:  # the kernel gives lse 0, not -inf, for a latent that saw nothing
                    lse_b = lse_b.masked_fill(~seen[:, None], float("-inf"))
                both = _finite(torch.logaddexp(lse, lse_b))
                out = torch.exp(lse - both)[..., None] * out + torch.exp(lse_b - both)[..., None] * out_b
                lse = torch.logaddexp(lse, lse_b)
            out, lse = merge(out, lse, keys.group)
            out = out.to(q.dtype)
            result = out
            if keys.uniform_rows is not None:
                mean = v.sum(dim=2, keepdim=True, dtype=torch.float32)
                if keys.group is not None:
                    dist.all_reduce(mean, group=keys.group)
                mean = (mean / keys.length).to(q.dtype)
                result = torch.where(keys.uniform_rows[:, None, :, None], mean, out)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.keys, ctx.blocks = keys, blocks
        return result

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        keys: KeySlice = ctx.keys
        # Every rank consumed the replicated output: its gradient is the sum of theirs.
        grad = grad.contiguous().clone()
        if keys.group is not None:
            dist.all_reduce(grad, group=keys.group)
        grad_mean = None
        if keys.uniform_rows is not None:
            uniform = keys.uniform_rows[:, None, :, None]
            grad_mean = (grad.float() * uniform).sum(dim=2, keepdim=True) / keys.length  # [B, H, 1, dh]
            grad = grad.masked_fill(uniform, 0)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        with torch.autocast(q.device.type, enabled=False):
            for a, b, masked in ctx.blocks:
                mask = keys.mask(a, b, q.dtype)[0] if masked else None
                dq_b, dk[:, :, a:b], dv[:, :, a:b] = block_backward(
                    grad, q, k[:, :, a:b], v[:, :, a:b], out, lse, mask, keys.portable
                )
                dq += dq_b
        if grad_mean is not None:
            dv += grad_mean.to(dv.dtype)
        return dq.to(q.dtype), dk, dv, None


class ContextParallel(nn.Module):
    """A ``PerceiverAR`` whose training forward splits each row's inputs across ``group``.

    Called like the model (``inputs``, ``positions``, ``num_latents``,
    ``full_rows``, ``validate``) with the whole batch on every rank of the
    group; returns the same logits and latent indices on every rank. The
    wrapped model is unchanged: it evaluates, generates and saves as usual.
    ``group`` None is one process (K = 1), which runs the same code.
    ``full_block``/``masked_block``: keys per kernel call (``KeySlice``);
    ``portable``: the portable kernel even on the CPU (None: on other devices only).
    """

    def __init__(
        self,
        model: PerceiverAR,
        group: dist.ProcessGroup | None = None,
        full_block: int = FULL_BLOCK,
        masked_block: int = MASKED_BLOCK,
        portable: bool | None = None,
    ):
        super().__init__()
        self.module = model
        self.group = group
        self.full_block, self.masked_block, self.portable = full_block, masked_block, portable
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)

    def forward(
        self,
        inputs: Tensor,
        positions: Tensor | None = None,
        num_latents: int | None = None,
        *,
        full_rows: bool | None = None,
        validate: bool = True,
    ) -> PerceiverAROutput:
        model, cfg = self.module, self.module.config
        M = cfg.num_latents if num_latents is None else int(num_latents)
        if validate:
            M = model.check_inputs(inputs, positions, num_latents)
        if full_rows is None:
            full_rows = bool((inputs != PAD_ID).all())
        inputs = inputs.long()
        M = min(M, inputs.shape[1])
        positions = default_positions(inputs) if positions is None else positions
        rot_pos = positions if positions.dim() == 2 else positions[..., 0]  # [B, T]
        axes = positions if positions.dim() == 3 else positions[..., None]  # [B, T, axes]

        # Cross-attend dropout exactly as the model draws it (the same random
        # numbers in the same order), on positions instead of embeddings.
        input_keep = kept_index = None
        if model.training and cfg.cross_attend_dropout > 0:
            inputs, axes, rot_pos, input_keep, kept_index = model.cross_attend_dropout(
                inputs, axes, rot_pos, M
            )
        positions = axes if positions.dim() == 3 else axes[..., 0]

        B, T = inputs.shape
        latent_index = latent_indices(sequence_lengths(inputs), M)  # [B, M]
        masks = build_masks(inputs, latent_index, input_keep, full_rows=bool(full_rows))
        if model.training and cfg.latent_dropout > 0:
            masks = with_latent_dropout(masks, latent_index, cfg.latent_dropout)
        gather = latent_index % T  # -1 wraps to T-1, as in the model
        latent_pos = positions.gather(
            1, gather if positions.dim() == 2 else gather[..., None].expand(B, M, -1)
        )
        z0 = model.latent_init(model.embed(inputs.gather(1, gather), latent_pos))  # [B, M, D]

        start, end = slice_bounds(T, self.size, self.rank)
        emb = model.embed(inputs[:, start:end], positions[:, start:end])  # [B, T_r, E]
        ropes = model.rotary(rot_pos.gather(1, gather), rot_pos[:, start:end])
        if masks.cross is None:  # full rows: latent i sees inputs 0 .. T - M + i
            last, keep, lo, hi = latent_index, None, T - M, T - 1
        else:
            last, keep = masks.cross.last, masks.cross.keep
            lo, hi = torch.stack([last.min(), last.max()]).tolist()  # a host sync, M-sized
        keys = KeySlice(
            last=last,
            start=start,
            length=T,
            lo=lo,
            hi=hi,
            keep=None if keep is None else keep[:, start:end],
            uniform_rows=masks.uniform_rows,
            group=self.group if self.size > 1 else None,
            full_block=self.full_block,
            masked_block=self.masked_block,
            portable=inputs.device.type != "cpu" if self.portable is None else self.portable,
        )
        kernel = lambda q, k, v: ContextParallelAttention.apply(q, k, v, keys)  # noqa: E731
        logits = model.trunk(z0, emb, replace(masks, cross_kernel=kernel), ropes, None)  # [B, M, V]

        if kept_index is not None:  # latents in the coordinates of the caller's inputs
            latent_index = torch.where(
                latent_index >= 0, kept_index.gather(1, latent_index.clamp(min=0)), latent_index
            )
        return PerceiverAROutput(logits=logits, latent_index=latent_index)
