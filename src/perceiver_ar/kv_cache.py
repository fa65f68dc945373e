"""The KV cache of cached generation: preallocated keys and values, written by index.

It implements the small protocol of ``perceiver_ar.attention`` (``ModelCache``:
one buffer for the cross-attend, one per latent layer), so the model reads and
writes it without importing this module. The generator (``perceiver_ar.generate``)
owns it: it creates one per generation, primes it, steps it and resets it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import PerceiverARConfig
from .model import PerceiverAR


class KVSlots:
    """Preallocated keys and values of one attention layer, [B, H, S, dh], written by index.

    The keys are stored after projection and rotary, so a cached key never
    needs its position again. Slots [0, length) are valid. An empty cache
    takes a whole block at once (the prime or a reset); after that, one entry
    per step. ``ring`` (the cross-attend cache) lets writes wrap around once
    all S slots are full, overwriting the oldest input: the window slides.
    Order within the cache does not matter, because the one new query sees
    every cached entry.
    """

    def __init__(self, batch_size: int, num_heads: int, slots: int, head_dim: int, ring: bool, **factory):
        self.k = torch.zeros(batch_size, num_heads, slots, head_dim, **factory)
        self.v = torch.zeros_like(self.k)
        self.ring = ring
        self.length = 0  # valid slots
        self.next = 0  # slot the next step writes

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def clear(self) -> None:
        self.length = self.next = 0  # stale slots are never read, so nothing is zeroed

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values [B, H, T, dh]; return every valid one to attend to."""
        T = k.shape[2]
        if self.length == 0:
            if T > self.capacity:
                raise ValueError(f"{T} entries do not fit a cache of {self.capacity} slots")
            self.k[:, :, :T] = k
            self.v[:, :, :T] = v
            self.length = self.next = T
            return k, v  # the same values, kept contiguous for the block-causal forward
        if T != 1:
            raise ValueError(f"a filled cache takes one entry per step, got {T}")
        if self.next == self.capacity:
            if not self.ring:
                raise ValueError("the latent cache is full: reset it with a full forward first")
            self.next = 0
        self.k[:, :, self.next] = k[:, :, 0]
        self.v[:, :, self.next] = v[:, :, 0]
        self.next += 1
        self.length = min(self.length + 1, self.capacity)
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class KVCache:
    """Every cache one generation needs: N cross-attend slots and M slots per latent layer.

    Owned by the generator and passed to ``model(..., cache=cache)``; it is not
    a module, so it never appears in a ``state_dict``.
    """

    def __init__(
        self,
        config: PerceiverARConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        cfg = config
        factory = dict(device=device, dtype=dtype)
        self.batch_size = batch_size
        self.cross = KVSlots(
            batch_size, cfg.cross_attend_heads, cfg.context_len, cfg.cross_attend_head_dim, True, **factory
        )
        self.latent = [
            KVSlots(batch_size, cfg.latent_heads, cfg.num_latents, cfg.latent_head_dim, False, **factory)
            for _ in range(cfg.num_latent_layers)
        ]

    @classmethod
    def for_model(cls, model: PerceiverAR, batch_size: int) -> KVCache:
        """A cache in the dtype the model's keys and values come in.

        That is the parameters' dtype (a model cast to bf16 caches bf16), or
        under an enabled autocast for the model's device its dtype: the cached
        keys must meet the new query in one dtype.
        """
        p = next(model.parameters())
        dtype = p.dtype
        if torch.is_autocast_enabled(p.device.type) and p.dtype == torch.float32:
            dtype = torch.get_autocast_dtype(p.device.type)
        return cls(model.config, batch_size, device=p.device, dtype=dtype)

    @property
    def num_inputs(self) -> int:
        """Inputs whose keys/values are cached (the window, at most N)."""
        return self.cross.length

    def clear(self) -> None:
        self.cross.clear()
        for layer in self.latent:
            layer.clear()
