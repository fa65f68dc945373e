"""The KV cache of cached generation: preallocated keys and values, written by index.

It implements the small protocol of ``perceiver_ar.attention`` (``ModelCache``:
one buffer for the cross-attend, one per latent layer), so the model reads and
writes it without importing this module. The generator (``perceiver_ar.generate``)
owns it: it creates one per generation, primes it, steps it and resets it.

Two ways in: ``update`` (a whole block into an empty cache: the prime, a full
reset) keeps host-side counts and returns exactly the valid entries; ``extend``
(every decode step) keeps its write position in a 0-d tensor on the cache's
device and returns the whole buffers with a mask of the slots each new query
sees, so a step has the same shapes every time: it never reads a value back
to the host and compiles to one graph (as gpt-fast's static cache does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import PerceiverARConfig
from .model import PerceiverAR


class KVSlots:
    """Preallocated keys and values of one attention layer, [B, H, S, dh], written by index.

    The keys are stored after projection and rotary, so a cached key never
    needs its position again. An empty cache takes a whole block at once
    (``update``: the prime or a full reset); after that, entries come one step
    at a time (``extend``; ``update`` also takes single entries). ``ring``
    (the cross-attend cache) lets writes wrap around once all S slots are
    full, overwriting the oldest input: the window slides. Order within the
    cache does not matter to a step, because the one new query sees every
    cached entry; a reset's queries see entries by age.
    """

    def __init__(self, batch_size: int, num_heads: int, slots: int, head_dim: int, ring: bool, **factory):
        self.k = torch.zeros(batch_size, num_heads, slots, head_dim, **factory)
        self.v = torch.zeros_like(self.k)
        self.ring = ring
        self.length = 0  # valid slots (host count, kept by ``update``)
        self.next = 0  # slot the next step writes (host count, kept by ``update``)
        # Kept on the device for ``extend``: the slot the next entry goes to, and an
        # additive mask over the slots (0 once written, -inf before) that a step's
        # query reads as it is; it never needs a boolean mask converted per layer.
        self.cursor = torch.zeros((), dtype=torch.long, device=self.k.device)
        self.bias = torch.full((slots,), float("-inf"), dtype=self.k.dtype, device=self.k.device)
        self.slot_index = torch.arange(slots, device=self.k.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def clear(self) -> None:
        self.length = self.next = 0  # stale slots are never read, so nothing is zeroed
        self.cursor.zero_()
        self.bias.fill_(float("-inf"))

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values [B, H, T, dh]; return every valid one to attend to."""
        T = k.shape[2]
        if self.length == 0:
            if T > self.capacity:
                raise ValueError(f"{T} entries do not fit a cache of {self.capacity} slots")
            self.k[:, :, :T] = k
            self.v[:, :, :T] = v
            self.length = self.next = T
            self.bias[:T] = 0.0
            self.cursor.fill_(T % self.capacity)
            return k, v  # the same values, kept contiguous for the block-causal forward
        if T != 1:
            raise ValueError(f"a filled cache takes one entry per step, got {T}")
        if self.next == self.capacity:
            if not self.ring:
                raise ValueError("the latent cache is full: reset it with a full forward first")
            self.next = 0
        self.k[:, :, self.next] = k[:, :, 0]
        self.v[:, :, self.next] = v[:, :, 0]
        self.bias[self.next] = 0.0
        self.next += 1
        self.length = min(self.length + 1, self.capacity)
        self.cursor.fill_(self.next % self.capacity)
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def extend(self, k: Tensor, v: Tensor, num_queries: int) -> tuple[Tensor, Tensor, Tensor]:
        """A decode step: store F new entries [B, H, F, dh]; return both buffers and the visible slots.

        The entries go to the slots after the newest (wrapping in a ring; the
        generator never lets a latent cache overflow). The queries are those
        of the newest ``num_queries`` entries, oldest first: one for a step,
        which sees every written slot (the additive mask [1, 1, 1, S] as it
        is); a reset's fill, where query j sees the written slots at least
        ``num_queries - 1 - j`` entries old (a boolean mask [1, 1, Q, S]).
        Shapes never depend on how full the cache is and the counts stay on
        the device: no host sync, one compiled graph per Q.
        """
        S, F, Q = self.capacity, k.shape[2], num_queries
        slots = self.cursor.view(1) if F == 1 else (self.cursor + self.slot_index[:F]) % S
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        self.bias.index_fill_(0, slots, 0.0)
        self.cursor.add_(F).remainder_(S)
        if Q == 1:
            return self.k, self.v, self.bias.view(1, 1, 1, S)
        age = (self.cursor - 1 - self.slot_index) % S  # [S]: 0 for the newest entry
        oldest_visible = (Q - 1) - self.slot_index[:Q]  # [Q]
        visible = (age[None, :] >= oldest_visible[:, None]) & (self.bias == 0.0)[None, :]
        return self.k, self.v, visible[None, None]


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
        max_inputs: int | None = None,
        max_latents: int | None = None,
    ):
        cfg = config
        factory = dict(device=device, dtype=dtype)
        inputs = cfg.context_len if max_inputs is None else max(1, min(max_inputs, cfg.context_len))
        latents = cfg.num_latents if max_latents is None else max(1, min(max_latents, cfg.num_latents))
        self.batch_size = batch_size
        self.cross = KVSlots(
            batch_size, cfg.cross_attend_heads, inputs, cfg.cross_attend_head_dim, True, **factory
        )
        self.latent = [
            KVSlots(batch_size, cfg.latent_heads, latents, cfg.latent_head_dim, False, **factory)
            for _ in range(cfg.num_latent_layers)
        ]

    @classmethod
    def for_model(
        cls,
        model: PerceiverAR,
        batch_size: int,
        max_inputs: int | None = None,
        max_latents: int | None = None,
    ) -> KVCache:
        """A cache in the dtype the model's keys and values come in.

        That is the parameters' dtype (a model cast to bf16 caches bf16), or
        under an enabled autocast for the model's device its dtype: the cached
        keys must meet the new query in one dtype. ``max_inputs`` and
        ``max_latents`` size it below N and M slots when a generation will
        never hold more (a decode step reads every slot, valid or not).
        """
        p = next(model.parameters())
        dtype = p.dtype
        if torch.is_autocast_enabled(p.device.type) and p.dtype == torch.float32:
            dtype = torch.get_autocast_dtype(p.device.type)
        return cls(
            model.config,
            batch_size,
            device=p.device,
            dtype=dtype,
            max_inputs=max_inputs,
            max_latents=max_latents,
        )

    @property
    def num_inputs(self) -> int:
        """Inputs whose keys/values are cached (the window, at most N)."""
        return self.cross.length

    def clear(self) -> None:
        self.cross.clear()
        self.clear_latents()

    def clear_latents(self) -> None:
        """Empty the latent caches and keep the cross-attend ring (a reset that reuses the window's keys)."""
        for layer in self.latent:
            layer.clear()
