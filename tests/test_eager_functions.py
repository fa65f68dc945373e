"""The eager forms that replace chains of small kernels: rotary and squared ReLU.

Each must compute what the plain autograd form computes, forward and
backward, on the layouts the model feeds it (q and k come out of the
projections as transposed views).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perceiver_ar.model import squared_relu
from perceiver_ar.rotary import _rotate_pairs, apply_rotary, apply_rotary_, full_phase, rope


def slice_rotate_concatenate(x, cos, sin, phase):
    """The plain autograd form: rotate the first channels, concatenate the rest."""
    r = 2 * cos.shape[-1]
    return torch.cat((_rotate_pairs(x[..., :r], cos, sin, phase), x[..., r:]), dim=-1)


def projected_heads(batch, length, heads, head_dim, dtype=torch.float32):
    """[B, H, T, dh] as the projections give it: a transposed view of [B, T, H * dh]."""
    flat = torch.randn(batch, length, heads * head_dim, dtype=dtype)
    return flat.unflatten(-1, (heads, head_dim)).transpose(1, 2).detach().requires_grad_()


@pytest.mark.parametrize("widened", [False, True])
@pytest.mark.parametrize("rotary_dim,head_dim", [(8, 16), (16, 16), (2, 6)])
def test_rotary_matches_slicing_forward_and_backward(rotary_dim, head_dim, widened):
    torch.manual_seed(0)
    positions = torch.arange(3, 3 + 11).expand(2, 11)
    cos, sin, phase = rope(positions, rotary_dim, 64)
    wide = rope(positions, rotary_dim, 64, head_dim=head_dim)[2]
    assert wide.shape[-1] == head_dim // 2 and torch.equal(wide[..., : rotary_dim // 2], phase)
    assert torch.equal(wide[..., rotary_dim // 2 :], torch.ones_like(wide[..., rotary_dim // 2 :]))
    x = projected_heads(2, 11, 3, head_dim)
    ref_x = x.detach().clone().requires_grad_()
    out = apply_rotary(x, cos, sin, wide if widened else phase)
    ref = slice_rotate_concatenate(ref_x, cos, sin, phase)
    # The same complex multiply; in place and out of place may take other vector paths (FMA or not).
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # The in-place form (inference) takes the widened phase too.
    in_place = apply_rotary_(x.detach().clone(), cos, sin, wide if widened else phase)
    torch.testing.assert_close(in_place, ref, rtol=0, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=1e-6)
    # The channels that do not rotate pass the gradient through unchanged.
    assert torch.equal(x.grad[..., rotary_dim:], grad[..., rotary_dim:])


def test_rotary_and_squared_relu_gradients_are_exact_in_float64():
    positions = torch.arange(1, 6).expand(1, 5)
    cos, sin, phase = rope(positions, 4, 16)
    cos, sin, phase = cos.double(), sin.double(), phase.to(torch.complex128)
    x = projected_heads(1, 5, 2, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin, phase), (x,))
    y = torch.rand(4, 7, dtype=torch.float64) - 0.5
    y = (y + 0.1 * y.sign()).requires_grad_()  # at least 0.1 from the kink at 0
    assert torch.autograd.gradcheck(squared_relu, (y,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_relu_matches_relu_then_square(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    out, ref = squared_relu(x), F.relu(ref_x).square()
    assert out.dtype == dtype and torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, ref_x.grad)  # 2 r g and g (2 r): scaling by 2 is exact


def test_full_phase_widens_only_what_is_narrower():
    phase = torch.polar(torch.ones(1, 1, 4, 3), torch.rand(1, 1, 4, 3))
    wide = full_phase(phase, 10)
    assert wide.shape == (1, 1, 4, 5)
    assert full_phase(wide, 10) is wide
