"""Drawing the next token from logits: temperature, top-k, top-p, allowed ids; PAD never drawn."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .vocab import PAD_ID

# The one default sampling temperature of the library and every command: 1.0
# draws from the model's own distribution; lower is more conservative, 0 is greedy.
DEFAULT_TEMPERATURE = 1.0


def sample(
    logits: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    allowed_tokens: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """One id per row from logits [B, V]; temperature 0 is greedy.

    allowed_tokens, when given, are the only ids that can be drawn (an image
    model draws pixel ids only); top_k and top_p then choose among them: top_k
    keeps the k largest logits, top_p the smallest set of most likely ids whose
    probability reaches p; the rest can never be drawn. PAD is never drawn:
    inside a window it would read as the end of the sequence.
    """
    logits = logits.float().clone()
    if allowed_tokens is not None:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[torch.as_tensor(allowed_tokens, device=logits.device)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    logits[:, PAD_ID] = float("-inf")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely id always stays
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def allowed_ids(allowed_tokens, vocab_size: int, device: torch.device) -> Tensor | None:
    """``allowed_tokens`` checked and as a LongTensor on ``device``, once per generation."""
    if allowed_tokens is None:
        return None
    ids = torch.as_tensor(allowed_tokens if torch.is_tensor(allowed_tokens) else list(allowed_tokens))
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        raise ValueError("allowed_tokens must be a list (or 1-D tensor) of integer token ids")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"allowed_tokens must lie in [0, {vocab_size}), got ids {int(ids.min())}..{int(ids.max())}"
        )
    if not bool((ids != PAD_ID).any()):
        raise ValueError(
            f"allowed_tokens must hold at least one id other than PAD ({PAD_ID}), which is never drawn"
        )
    return ids.long().to(device)
