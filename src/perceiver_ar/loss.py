"""The training loss: cross-entropy plus z-loss over valid latents.

The official code (experiment._loss_fn) sums the loss over the batch and the
latents; ``LossOutput.total`` reproduces that sum, ``LossOutput.mean`` is the
per-token average that training usually optimises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .vocab import PAD_ID


@dataclass
class LossOutput:
    total: Tensor  # summed CE + z-loss over counted latents (the official number)
    total_z_loss: Tensor  # the z-loss part of ``total``
    total_ce: Tensor  # the cross-entropy part of ``total`` (nats)
    num_tokens: Tensor  # how many latents were counted
    per_latent: Tensor  # [B, M] CE + z-loss, 0 where not counted
    mask: Tensor  # [B, M] which latents were counted

    @property
    def mean(self) -> Tensor:
        """CE + z-loss per counted token."""
        return self.total / self.num_tokens.clamp(min=1)

    @property
    def mean_ce(self) -> Tensor:
        """Cross-entropy per counted token, in nats (divide by ln 2 for bits)."""
        return self.total_ce / self.num_tokens.clamp(min=1)


def latent_labels(targets: Tensor, latent_index: Tensor) -> Tensor:
    """The label of each latent: the target at its input index ([B, M]).

    Invalid latents (-1) take the last column, as the official code's wrapping
    index does; they are never counted.
    """
    T = targets.shape[1]
    return targets.gather(1, latent_index % T)


def perceiver_ar_loss(
    logits: Tensor,
    targets: Tensor,
    latent_index: Tensor,
    z_loss: float = 1e-4,
) -> LossOutput:
    """Cross-entropy + ``z_loss * logsumexp**2`` of each valid latent with a non-PAD label.

    logits [B, M, V] from the model; targets [B, T] holds, at every input
    index, the token that follows it (PAD where nothing follows);
    latent_index [B, M] from the model output.
    """
    labels = latent_labels(targets, latent_index)
    mask = (latent_index >= 0) & (labels != PAD_ID)
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # [B, M]
    label_logit = logits.gather(-1, labels[..., None]).squeeze(-1)
    ce = lse - label_logit
    zl = z_loss * lse.square()
    maskf = mask.to(logits.dtype)
    per_latent = (ce + zl) * maskf
    return LossOutput(
        total=per_latent.sum(),
        total_z_loss=(zl * maskf).sum(),
        total_ce=(ce * maskf).sum(),
        num_tokens=mask.sum(),
        per_latent=per_latent,
        mask=mask,
    )


def shift_events(events: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs and targets from a right-padded event batch [B, T+1], as the official code.

    inputs: the events with each row's last valid event replaced by PAD (it
    has no successor to predict), then ``[:, :-1]``; targets: the unmodified
    ``events[:, 1:]``.
    """
    truncated = events.clone()
    B, T1 = events.shape
    idx = torch.arange(T1, device=events.device)
    lengths = torch.where(events == PAD_ID, idx, torch.full_like(events, T1)).min(dim=1).values
    truncated[torch.arange(B, device=events.device), (lengths - 1).clamp(min=0)] = PAD_ID
    return truncated[:, :-1], events[:, 1:]
