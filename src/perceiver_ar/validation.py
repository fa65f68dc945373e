"""What the model refuses to compute: input checks that name the fix.

``check_inputs`` is what ``PerceiverAR.forward(validate=True)`` runs before a
forward (and ``PerceiverAR.check_inputs`` calls); trusted callers (the
trainer, the evaluator, the generator) check their data where it enters and
skip it. Every check reads tensor values in one host sync. The model file
keeps only modules; these are functions of the config, the device and the
tensors.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .config import PerceiverARConfig
from .vocab import PAD_ID

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_inputs(
    cfg: PerceiverARConfig,
    device: torch.device,
    inputs: Tensor,
    positions: Tensor | None = None,
    num_latents: int | None = None,
) -> int:
    """Raise ValueError, naming the fix, for inputs a model of ``cfg`` on ``device`` cannot take.

    Refused: inputs that are not an integer tensor [B, T] on the model's
    device, an empty batch or row, T > context_len, ids outside the
    vocabulary, PAD anywhere but at the end of a row (left or middle padding
    would put latents on the wrong inputs), a row of PAD only, a num_latents
    that is not an integer in [1, context_len], and positions whose shape,
    dtype, device or values do not fit. Returns M for the call.
    """
    if not torch.is_tensor(inputs):
        raise ValueError(f"inputs must be a tensor of token ids [batch, length], got {type(inputs).__name__}")
    if inputs.dim() != 2:
        raise ValueError(f"inputs must be [batch, length] token ids, got shape {tuple(inputs.shape)}")
    if inputs.dtype not in INTEGER_DTYPES:
        raise ValueError(f"inputs must be integer token ids, got {inputs.dtype}: use inputs.long()")
    B, T = inputs.shape
    if B < 1:
        raise ValueError("inputs hold no rows (a batch of 0): pass at least one row")
    if T < 1:
        raise ValueError("inputs must hold at least one token")
    if T > cfg.context_len:
        raise ValueError(
            f"input length {T} exceeds context_len {cfg.context_len}: crop the input to its "
            "last context_len tokens or build the model with a longer context_len"
        )
    if inputs.device != device:
        raise ValueError(f"inputs are on {inputs.device} but the model on {device}: move them with .to()")
    M = resolve_num_latents(num_latents, cfg.num_latents, cfg.context_len)
    # Every value check in one host sync: id range, padding only at the end, no empty row.
    valid = inputs != PAD_ID
    lengths = valid.sum(dim=1)
    right_padded = (valid == (torch.arange(T, device=device) < lengths[:, None])).all(dim=1)
    lo, hi, bad_rows, empty_rows = torch.stack(
        [inputs.min().long(), inputs.max().long(), (~right_padded).sum(), (lengths == 0).sum()]
    ).tolist()
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(
            f"token ids must lie in [0, {cfg.vocab_size}) for vocab_size {cfg.vocab_size}, "
            f"got ids from {lo} to {hi}"
        )
    if bad_rows:
        row = int((~right_padded).nonzero()[0, 0])
        raise ValueError(
            f"row {row} has PAD ({PAD_ID}) before a token: rows must be right-padded (PAD only at "
            "the end; left or middle padding would put the latents on the wrong inputs)"
        )
    if empty_rows:
        row = int((lengths == 0).nonzero()[0, 0])
        raise ValueError(f"row {row} holds only PAD: every row needs at least one token")
    if positions is not None:
        check_positions(cfg, inputs, positions)
    return M


def check_positions(cfg: PerceiverARConfig, inputs: Tensor, positions: Tensor) -> None:
    """Positions [B, T] (or [B, T, axes]) of integers >= 0 like ``inputs``, inside absolute tables."""
    B, T = inputs.shape
    if not torch.is_tensor(positions) or positions.dtype not in INTEGER_DTYPES:
        kind = positions.dtype if torch.is_tensor(positions) else type(positions).__name__
        raise ValueError(f"positions must be a tensor of integer positions, got {kind}")
    if positions.device != inputs.device:
        raise ValueError(f"positions are on {positions.device} but inputs on {inputs.device}")
    n_axes = len(cfg.position_table_sizes) if cfg.position_encoding == "absolute" else 1
    ok_shape = positions.shape == (B, T) or (positions.dim() == 3 and positions.shape[:2] == (B, T))
    if not ok_shape:
        raise ValueError(
            f"positions must be [B, T] or [B, T, axes] like inputs {tuple(inputs.shape)}, "
            f"got {tuple(positions.shape)}"
        )
    axes = 1 if positions.dim() == 2 else positions.shape[2]
    if axes != n_axes:
        raise ValueError(f"positions have {axes} index axes but the model expects {n_axes}")
    idx = positions if positions.dim() == 3 else positions[..., None]
    lows, highs = idx.amin(dim=(0, 1)).tolist(), idx.amax(dim=(0, 1)).tolist()
    if min(lows) < 0:
        raise ValueError(f"positions must be >= 0 (1-based, 0 on padding), got {min(lows)}")
    if cfg.position_encoding == "absolute":
        for axis, size in enumerate(cfg.position_table_sizes):
            if highs[axis] >= size:
                raise ValueError(
                    f"position {highs[axis]} on axis {axis} is outside the position table of "
                    f"{size} rows: raise position_table_sizes or use rotary positions"
                )


def resolve_num_latents(num_latents: object, default: int, context_len: int) -> int:
    """The M of a call: ``default`` for None, else an integer in [1, context_len] (3.0 is 3, 2.5 refused)."""
    if num_latents is None:
        return default
    value: object = num_latents
    if torch.is_tensor(value) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"num_latents must be an integer, got {num_latents!r}")
    if not 1 <= int(value) <= context_len:
        raise ValueError(f"num_latents must be in [1, context_len={context_len}], got {num_latents}")
    return int(value)


def check_cache_fill(inputs: Tensor, training: bool) -> None:
    """A cache is filled by an eval-mode forward over a window without padding."""
    if training:
        raise ValueError("cached generation needs model.eval(): dropout would corrupt the cache")
    if not bool((inputs != PAD_ID).all()):
        raise ValueError("a cache can only be filled from inputs without padding")
