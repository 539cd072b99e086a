"""GRAPE-M rotation (MATH.md §2): RoPE at init, hand-computed rotations, the relative law, gradients."""

import math

import pytest
import torch

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.ops import grape_m_init_log_freq, grape_m_rotate, grape_m_theta
from ops_testing import assert_opcheck, rel_err

F64 = torch.float64


def rope_rotate_half(x, base, positions):
    """Plain RoPE written the Hugging Face way (cat(freqs, freqs) and rotate_half), in fp64."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=F64) / D)                        # (D/2,)
    emb = torch.cat([torch.outer(positions.to(F64), inv_freq)] * 2, dim=-1)           # (T, D)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def test_init_log_freq_literals():
    # p_j = c ln(base^(-2j/D)): D=4, base 1e4, c=16 -> [0, -8 ln(1e4)]
    p = grape_m_init_log_freq(4, 10000.0, 16.0)
    assert p.dtype == torch.float32 and p.shape == (2,)
    torch.testing.assert_close(p, torch.tensor([0.0, -73.68272297580947]), rtol=1e-7, atol=0)


def test_theta_at_init_is_rope_spectrum():
    # theta_j = base^(-2j/D): D=8, base 1e4 -> 10^-j
    theta = grape_m_theta(grape_m_init_log_freq(8, 10000.0, 16.0), 16.0)
    assert theta.dtype == torch.float32
    torch.testing.assert_close(theta, torch.tensor([1.0, 0.1, 0.01, 0.001]), rtol=1e-6, atol=0)


def test_rotation_by_hand():
    # D=4, theta=[1, 0.01]; pairs (0,2) and (1,3)
    theta = torch.tensor([1.0, 0.01], dtype=F64)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0],        # position 0: unchanged
                      [1.0, 1.0, 0.0, 0.0]],       # position 1: plane 0 turns by 1 rad, plane 1 by 0.01
                     dtype=F64).view(1, 1, 2, 4)
    out = grape_m_rotate(x, theta)
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                             [0.5403023058681398, 0.9999500004166653, 0.8414709848078965, 0.009999833334166664]],
                            dtype=F64)
    torch.testing.assert_close(out.view(2, 4), expected, rtol=0, atol=1e-15)
    # pos_offset 1: the second row sits at position 2
    out = grape_m_rotate(x, theta, 1)
    torch.testing.assert_close(out[0, 0, 1], torch.tensor(
        [-0.4161468365471424, 0.9998000066665778, 0.9092974268256817, 0.01999866669333308], dtype=F64), rtol=0, atol=1e-15)


def test_fixed_frequencies_equal_rope():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 8, dtype=F64)
    theta = 10000.0 ** (-torch.arange(0, 8, 2, dtype=F64) / 8)
    torch.testing.assert_close(grape_m_rotate(x, theta), rope_rotate_half(x, 10000.0, torch.arange(16)), rtol=0, atol=1e-13)
    # the fp32 path from the init helper agrees to fp32 precision
    theta32 = grape_m_theta(grape_m_init_log_freq(8, 10000.0, 16.0), 16.0)
    out32 = grape_m_rotate(x.float(), theta32)
    assert out32.dtype == torch.float32
    assert rel_err(out32, rope_rotate_half(x, 10000.0, torch.arange(16))) < 1e-5


def test_relative_law_shift_invariance():
    # (G(i) q).(G(j) k) depends on j - i only: shifting all positions leaves the scores unchanged
    torch.manual_seed(1)
    q, k = torch.randn(2, 2, 12, 16, dtype=F64), torch.randn(2, 2, 12, 16, dtype=F64)
    theta = torch.rand(8, dtype=F64)
    scores = grape_m_rotate(q, theta) @ grape_m_rotate(k, theta).transpose(-1, -2)
    for shift in (1, 37, 256):   # rounding grows with the angle: ~7e-13 at a shift of 1000
        shifted = grape_m_rotate(q, theta, shift) @ grape_m_rotate(k, theta, shift).transpose(-1, -2)
        torch.testing.assert_close(shifted, scores, rtol=0, atol=1e-12)


def test_low_precision_input_rotates_in_fp32():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 64, 8).bfloat16()
    theta = grape_m_theta(grape_m_init_log_freq(8, 10000.0, 16.0), 16.0)
    out = grape_m_rotate(x, theta)
    assert out.dtype == torch.bfloat16
    expected = rope_rotate_half(x.double(), 10000.0, torch.arange(64)).bfloat16()   # one rounding, at the end
    assert (out.float() - expected.float()).abs().max().item() <= 2 ** -7 * expected.float().abs().max().item()


def test_noncontiguous_input():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 3, 8, dtype=F64).transpose(1, 2)                            # (B, H, T, D) view, as lowered
    theta = torch.rand(4, dtype=F64)
    torch.testing.assert_close(grape_m_rotate(x, theta), grape_m_rotate(x.contiguous(), theta), rtol=0, atol=0)


def test_theta_gradient_formula():
    # dL/dtheta_j = sum n (g2 r1 - g1 r2); with L = sum(w * r) the hand form below
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64).view(1, 1, 2, 4)
    theta = torch.tensor([0.5, 0.0], dtype=F64, requires_grad=True)
    r = grape_m_rotate(x, theta)
    r[0, 0, :, 2].sum().backward()   # d/dtheta_0 of sum_n sin(n theta_0) = sum_n n cos(n theta_0)
    torch.testing.assert_close(theta.grad, torch.tensor([math.cos(0.5), 0.0], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("pos_offset", [0, 3])
def test_gradcheck(pos_offset):
    torch.manual_seed(4)
    x = torch.randn(2, 2, 5, 6, dtype=F64, requires_grad=True)
    theta = torch.rand(3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grape_m_rotate(a, b, pos_offset), (x, theta))


def test_no_theta_grad_when_fixed():
    x = torch.randn(1, 1, 3, 4, requires_grad=True)
    theta = torch.tensor([1.0, 0.1])
    grape_m_rotate(x, theta).sum().backward()
    assert x.grad is not None and theta.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x = torch.randn(2, 3, 4, 8, dtype=dtype, requires_grad=True)
    theta = torch.rand(4, dtype=dtype, requires_grad=True)
    assert_opcheck(torch.ops.grapefx.grape_m_rotate.default, (x, theta, 2))
    assert_opcheck(torch.ops.grapefx.grape_m_rotate.default, (x.detach(), theta.detach(), 0))


def test_bad_theta_shape():
    with pytest.raises(ValueError, match=r"theta must be \(D/2,\)"):
        grape_m_rotate(torch.zeros(1, 1, 2, 8), torch.zeros(3))
