"""GRAPE-A / ALiBi (MATH.md §3): slopes for 8, 12, 16 heads as literals, the bias, its gradient."""

import pytest
import torch

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.ops import alibi_bias, alibi_slopes
from ops_testing import assert_opcheck

F64 = torch.float64
POW2_8 = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]   # 2^-1 .. 2^-8


def test_slopes_8_heads():
    assert alibi_slopes(8) == POW2_8


def test_slopes_16_heads():
    # 2^(-k/2), k = 1..16
    assert alibi_slopes(16) == pytest.approx([
        0.7071067811865476, 0.5, 0.3535533905932738, 0.25, 0.1767766952966369, 0.125, 0.08838834764831845,
        0.0625, 0.04419417382415922, 0.03125, 0.02209708691207961, 0.015625, 0.011048543456039806, 0.0078125,
        0.005524271728019903, 0.00390625], rel=1e-15)


def test_slopes_12_heads_non_power_of_two():
    # the 8 slopes of 8 heads, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 appended unsorted
    assert alibi_slopes(12) == pytest.approx(
        POW2_8 + [0.7071067811865476, 0.3535533905932738, 0.1767766952966369, 0.08838834764831845], rel=1e-15)


def test_slopes_small_counts():
    assert alibi_slopes(1) == [0.00390625]
    assert alibi_slopes(6) == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    with pytest.raises(ValueError, match="n_heads must be >= 1"):
        alibi_slopes(0)


def test_bias_by_hand():
    # q_len 2, k_len 3: queries at absolute positions 1 and 2; bias = -m_h (i - j), unmasked
    bias = alibi_bias(torch.tensor([0.5, 0.25]), 2, 3)
    assert bias.dtype == torch.float32 and bias.shape == (2, 2, 3)
    expected = torch.tensor([[[-0.5, 0.0, 0.5], [-1.0, -0.5, 0.0]],
                             [[-0.25, 0.0, 0.25], [-0.5, -0.25, 0.0]]])
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)


def test_bias_is_fp32_for_long_distances():
    # at distance 4095 a slope of 1/256 gives -15.99609375, which bf16 cannot hold
    bias = alibi_bias(torch.tensor([2.0 ** -8]), 4096, 4096)
    assert bias[0, 4095, 0].item() == -15.99609375


def test_gradcheck():
    slopes = torch.rand(3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: alibi_bias(s, 4, 6), (slopes,))


def test_slope_gradient_by_hand():
    # dL/dm_h = -sum (i - j) g; L = sum of the bias of head 0 over 2 queries x 3 keys at positions 1, 2
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)
    alibi_bias(slopes, 2, 3)[0].sum().backward()
    # distances (1, 0, -1) and (2, 1, 0) sum to 3
    torch.testing.assert_close(slopes.grad, torch.tensor([-3.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    slopes = torch.rand(4, dtype=dtype, requires_grad=True)
    assert_opcheck(torch.ops.grapefx.alibi_bias.default, (slopes, 3, 5))


def test_rejects_more_queries_than_keys():
    with pytest.raises(ValueError, match="q_len <= k_len"):
        alibi_bias(torch.ones(2), 4, 3)
