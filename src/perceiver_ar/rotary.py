"""Rotary position embeddings: the official frequencies, tables and the rotation of q and k.

Kept apart from ``attention.py`` (the kernels and masks): ``model.py`` computes
the tables once per forward and rotates each layer's queries and keys with them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _inverse_frequencies(rotary_dim: int, max_wavelength: float, device: torch.device) -> Tensor:
    num_bands = rotary_dim // 2
    exponents = (2.0 / rotary_dim) * torch.linspace(0, num_bands, num_bands, dtype=torch.float64)
    return (1.0 / (float(max_wavelength) ** exponents)).to(device=device, dtype=torch.float32)


_cached_inverse_frequencies = functools.lru_cache(maxsize=64)(_inverse_frequencies)


def rotary_tables(positions: Tensor, rotary_dim: int, max_wavelength: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, [B, 1, T, rotary_dim / 2].

    The official frequencies come from a ``linspace`` that includes its end
    point: exponents run over [0, 1] inclusive, so for 4 rotated channels and
    max_wavelength 64 the wavelengths are 1 and 64. They are computed once
    per (width, wavelength, device), not per forward (traced when compiled).
    """
    frequencies = _inverse_frequencies if torch.compiler.is_compiling() else _cached_inverse_frequencies
    inv_freq = frequencies(rotary_dim, float(max_wavelength), positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def rotary_phase(cos: Tensor, sin: Tensor) -> Tensor:
    """The tables as unit complex numbers cos + i sin: a rotation is one complex multiply."""
    return torch.complex(cos, sin)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, phase: Tensor | None = None) -> Tensor:
    """Rotate adjacent channel pairs (interleaved style) of the first channels.

    x [B, H, T, dh]; only the first 2 * cos.shape[-1] channels of each head
    rotate. Computed in the tables' fp32 and rounded once to x's dtype, so a
    bf16 q or k meets v in the kernel in one dtype. A pair (x0, x1) is x0 + i x1
    and the rotation one complex multiply by ``phase`` (``rotary_phase``, once
    per forward): fewer kernels than the real form, the same numbers. An x
    already in the tables' dtype (fp32) is multiplied whole, through a complex
    view of its own storage, by the phase widened to every channel
    (``full_phase``: 1 on the channels that do not rotate): one kernel forward
    and one backward (autograd's, by the conjugate phase), where slicing and
    concatenating takes several each way (a small model's training step is
    mostly per-operator cost). The channels that do not rotate are multiplied
    by 1 + 0i: the same values, except that an infinite one would turn its
    pair partner into NaN. Under torch.compile the real form is traced
    (Inductor fuses it into one kernel).
    """
    r = 2 * cos.shape[-1]
    if x.dtype == cos.dtype and _complex_view_ok(x) and x.shape[-1] % 2 == 0:
        phase = full_phase(rotary_phase(cos, sin) if phase is None else phase, x.shape[-1])
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * phase).flatten(-2)
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((_rotate_pairs(x_rot, cos, sin, phase), x_pass), dim=-1)


def full_phase(phase: Tensor, head_dim: int) -> Tensor:
    """``phase`` [..., r / 2] widened to every pair of a head, [..., head_dim / 2]: 1 past the rotated pairs.

    ``rope`` builds it once per forward when it is given the head width; a
    phase that is already that wide is returned as it is.
    """
    pairs = head_dim // 2
    if phase.shape[-1] == pairs:
        return phase
    return torch.cat((phase, phase.new_ones(*phase.shape[:-1], pairs - phase.shape[-1])), dim=-1)


def _rotate_pairs(x_rot: Tensor, cos: Tensor, sin: Tensor, phase: Tensor | None = None) -> Tensor:
    """The rotated channels [..., r] of ``apply_rotary``, in x_rot's dtype."""
    r = x_rot.shape[-1]
    x = x_rot.to(cos.dtype)
    if _complex_view_ok(x):
        phase = rotary_phase(cos, sin) if phase is None else phase[..., : r // 2]
        turned = torch.view_as_complex(x.unflatten(-1, (r // 2, 2))) * phase
        return torch.view_as_real(turned).flatten(-2).to(x_rot.dtype)
    x0, x1 = x.unflatten(-1, (r // 2, 2)).unbind(-1)
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return rotated.to(x_rot.dtype)


def _complex_view_ok(x: Tensor) -> bool:
    """Whether x's channel pairs can be viewed as complex numbers in eager mode (fp32, even strides)."""
    if torch.compiler.is_compiling() or x.dtype != torch.float32 or x.stride(-1) != 1:
        return False
    return x.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in x.stride()[:-1])


def apply_rotary_(x: Tensor, cos: Tensor, sin: Tensor, phase: Tensor | None = None) -> Tensor:
    """``apply_rotary`` in place, for inference: x must not need gradients.

    The out-of-place form allocates a rotated copy of x (the peak of a
    forward at 131,072 inputs). Here an fp32 x is multiplied in place
    through a complex view of its own storage; a bf16 or fp16 x is rotated in
    fp32 and written back rounded once, as ``apply_rotary`` does.
    """
    r = 2 * cos.shape[-1]
    x_rot = x[..., :r]
    if x.dtype == cos.dtype and _complex_view_ok(x_rot):
        torch.view_as_complex(x_rot.unflatten(-1, (r // 2, 2))).mul_(
            rotary_phase(cos, sin) if phase is None else phase[..., : r // 2]
        )
        return x
    x[..., :r] = _rotate_pairs(x_rot, cos, sin, phase)
    return x


def rope(
    positions: Tensor, rotary_dim: int, max_wavelength: float, head_dim: int | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The rotary tables of ``positions`` [B, T], once per forward for every layer that shares them.

    (cos, sin, phase): cos and sin [B, 1, T, rotary_dim / 2]; the phase as
    unit complex numbers, widened to ``head_dim`` channels when that is given
    (``full_phase``); None under torch.compile, where the real form is traced.
    """
    cos, sin = rotary_tables(positions, rotary_dim, max_wavelength)
    if torch.compiler.is_compiling():
        return cos, sin, None
    phase = rotary_phase(cos, sin)
    return cos, sin, phase if head_dim is None else full_phase(phase, head_dim)
