"""The cached decode step on packed weights: the one-token path at the CPU's memory bandwidth.

A decode step at batch 1 is a chain of matrix-vector products: its time is
the time to read every weight once. On the CPU (MKL's sgemv on this project's
machine) a product reads a weight at full memory bandwidth only when its rows
are long: ``x @ W.T`` with W [out, in] and a short ``in`` (every up
projection: q, k, v, the MLP's first layer) runs at about half of it, the
same product against the transposed copy [in, out] at the full rate. So for
one generation the step gets its own copy of the weights, packed once:

- the latent layers' q, k and v in one [D, 3D] matrix (one product, not
  three), the cross-attend's k and v in one [E, 2E];
- every matrix with more outputs than inputs stored transposed, [in, out];
  the others (the output projections, the MLP's second layer) are used in
  place, without a copy.

The step computes the same function as ``PerceiverAR.decode_step``, summed
in another order (float tolerance; the tests compare the two and check cache
== recompute and the golden samples through it). Only the newest latent's
logits are computed. ``perceiver_ar.generate`` packs on the CPU, where the
layout decides the speed; the copy costs the memory of about 60% of the
weights for the generation's duration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import KVBuffer, ModelCache, scaled_dot_product
from .model import CrossAttend, LatentLayer, PerceiverAR, Rope
from .rotary import apply_rotary_


class PackedLinear:
    """One or more ``nn.Linear`` of the same input, concatenated, in the layout that reads fastest.

    Transposed ([in, out], a copy) when the concatenation has more outputs
    than inputs; otherwise a single Linear's own weight, shared, not copied.
    """

    def __init__(self, *linears: nn.Linear):
        if any(lin.bias is None for lin in linears):
            raise ValueError("packed decoding expects every Linear to have a bias")
        with torch.no_grad():
            weight = linears[0].weight if len(linears) == 1 else torch.cat([lin.weight for lin in linears])
            bias = linears[0].bias if len(linears) == 1 else torch.cat([lin.bias for lin in linears])
            self.transposed = weight.shape[0] > weight.shape[1]
            # [in, out] when transposed: the product reads rows of `out` values.
            self.weight = weight.detach().t().contiguous() if self.transposed else weight.detach()
            self.bias = bias.detach()

    def __call__(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        weight = self.weight if self.transposed else self.weight.t()
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)


@dataclass
class PackedLayer:
    """One attention + MLP block: the queries (with k, v when they read the same input), k/v, out, MLP."""

    q: PackedLinear  # latent layers: q, k and v together
    kv: PackedLinear | None  # cross-attend: k and v of the inputs
    out: PackedLinear
    w1: PackedLinear
    w2: PackedLinear
    num_heads: int


@dataclass
class PackedWeights:
    """Every weight a decode step reads, packed for one generation (``pack``)."""

    cross: PackedLayer
    latent: list[PackedLayer]


def pack(model: PerceiverAR) -> PackedWeights:
    """The model's weights packed for decoding. Pack again after the weights change."""

    def block(module: CrossAttend | LatentLayer, fuse_qkv: bool) -> PackedLayer:
        attn, ffn = module.attention, module.feed_forward
        return PackedLayer(
            q=PackedLinear(attn.wq, attn.wk, attn.wv) if fuse_qkv else PackedLinear(attn.wq),
            kv=None if fuse_qkv else PackedLinear(attn.wk, attn.wv),
            out=PackedLinear(attn.wo),
            w1=PackedLinear(ffn.w1),
            w2=PackedLinear(ffn.w2),
            num_heads=attn.num_heads,
        )

    return PackedWeights(
        cross=block(model.cross_attend, fuse_qkv=False),
        latent=[block(layer, fuse_qkv=True) for layer in model.latent_layers],
    )


def _heads(x: Tensor, parts: int, num_heads: int) -> list[Tensor]:
    """[B, T, parts * H * dh] -> ``parts`` views [B, H, T, dh]."""
    x = x.unflatten(-1, (parts, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return list(x.unbind(0))


def _attend_and_mlp(
    module: CrossAttend | LatentLayer,
    w: PackedLayer,
    z: Tensor,
    q: Tensor,
    kv: tuple[Tensor, Tensor],
    cache: KVBuffer,
    chunk_size: int = 0,
) -> Tensor:
    """Store the new keys/values, attend to the cache, then the residual MLP. [B, Q, D]."""
    k, v, mask = cache.extend(kv[0], kv[1], q.shape[2])
    out = scaled_dot_product(q, k, v, mask=mask, chunk_size=chunk_size)
    z = z + w.out(out.transpose(1, 2).flatten(2))
    return z + w.w2(module.feed_forward.act(w.w1(module.ffn_norm(z))))


def _rotated(q: Tensor, k: Tensor, rope_q: Rope | None, rope_k: Rope | None) -> tuple[Tensor, Tensor]:
    """q and k rotated in place: both are fresh projections that nothing else reads."""
    if rope_q is not None:
        q = apply_rotary_(q, *rope_q)
    if rope_k is not None:
        k = apply_rotary_(k, *rope_k)
    return q, k


@torch.no_grad()
def decode_step(
    model: PerceiverAR, weights: PackedWeights, inputs: Tensor, positions: Tensor, cache: ModelCache
) -> Tensor:
    """``PerceiverAR.decode_step`` on packed weights; the newest latent's logits [B, V].

    inputs [B, Q], positions [B, Q] (or [B, Q, axes]): the newest Q inputs,
    each hosting a latent (Q = 1 a step, Q = the fill a reset from the cache).
    """
    if model.training:
        raise ValueError("cached generation needs model.eval(): dropout would corrupt the cache")
    emb = model.embed(inputs, positions)  # [B, Q, E]
    rot_pos = positions if positions.dim() == 2 else positions[..., 0]
    # Every rotation here is in place (``_rotated``): the narrow phases are all it reads.
    ropes = model.rotary(rot_pos, rot_pos if rot_pos.shape[1] == 1 else rot_pos[:, -1:], widen=False)
    cross, w = model.cross_attend, weights.cross
    z = model.latent_init(emb)
    (q,) = _heads(w.q(cross.query_norm(z)), 1, w.num_heads)
    k, v = _heads(w.kv(cross.kv_norm(emb[:, -1:])), 2, w.num_heads)  # the one input new to the cache
    q, k = _rotated(q, k, ropes.cross_q, ropes.cross_k)
    z = _attend_and_mlp(cross, w, z, q, (k, v), cache.cross, cross.chunk_size)
    for layer, w, layer_cache in zip(model.latent_layers, weights.latent, cache.latent, strict=True):
        q, k, v = _heads(w.q(layer.attention_norm(z)), 3, w.num_heads)
        q, k = _rotated(q, k, ropes.latent, ropes.latent)
        z = _attend_and_mlp(layer, w, z, q, (k, v), layer_cache)
    return model.output(model.norm(z[:, -1]))
