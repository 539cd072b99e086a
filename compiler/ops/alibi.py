"""GRAPE-A / ALiBi: an additive linear position bias per query head (MATH.md §3).

Score for query i, key j, query head h: ``q_i . k_j * scale - m_h (i - j)``, added after the
scaling and kept in fp32 (in bf16 a bias of -16 has a spacing of 0.125). The slopes are the
ALiBi paper's (Press et al., arXiv:2108.12409), including its rule for head counts that are not
a power of two. GQA does not change them: there is one slope per *query* head.
"""

import torch
from torch import Tensor

from compiler.ops._util import compute_dtype


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi slopes m_0..m_{n-1}, head 0 steepest (MATH.md §3).

    n a power of two: ``m_k = 2^(-8k/n)``, k = 1..n. Otherwise, with p = 2^floor(log2 n): the p
    slopes for p heads, then the first n - p of ``2^(-4(2j-1)/p)``, j = 1, 2, ... appended
    unsorted (the odd-indexed slopes of 2p heads, as in ofirpress/attention_with_linear_biases).
    n = 12: 2^-1 .. 2^-8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    """
    if n_heads < 1:
        raise ValueError(f"alibi_slopes: n_heads must be >= 1, got {n_heads}")
    p = 1 << (n_heads.bit_length() - 1)                                 # largest power of 2 <= n
    slopes = [2.0 ** (-8.0 * k / p) for k in range(1, p + 1)]
    slopes += [2.0 ** (-4.0 * (2 * j - 1) / p) for j in range(1, n_heads - p + 1)]
    return slopes


def _distance(q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """i - j for query i at absolute position k_len - q_len + i and key j, (q_len, k_len)."""
    i = torch.arange(k_len - q_len, k_len, dtype=dtype, device=device)          # (q_len,)
    j = torch.arange(k_len, dtype=dtype, device=device)                         # (k_len,)
    return i[:, None] - j[None, :]


def _check(slopes: Tensor, q_len: int, k_len: int) -> None:
    if slopes.dim() != 1 or not slopes.is_floating_point():
        raise ValueError(f"alibi_bias: slopes must be a float vector (Hq,), got {tuple(slopes.shape)} {slopes.dtype}")
    if not 0 <= q_len <= k_len:
        raise ValueError(f"alibi_bias: need 0 <= q_len <= k_len (queries are the last q_len keys), got {q_len}, {k_len}")


@torch.library.custom_op("grapefx::alibi_bias", mutates_args=())
def alibi_bias(slopes: Tensor, q_len: int, k_len: int) -> Tensor:
    """The ALiBi bias ``-slopes[h] * (i - j)``, (Hq, q_len, k_len) fp32 (MATH.md §3).

    Query i sits at absolute position ``k_len - q_len + i`` (the queries are the last q_len
    positions, as in decoding). Not masked: entries with j > i are positive and must be masked
    separately. Gradient flows to slopes.
    """
    _check(slopes, q_len, k_len)
    cd = compute_dtype(slopes.dtype)
    dist = _distance(q_len, k_len, cd, slopes.device)                              # (q_len, k_len)
    return -slopes.to(cd)[:, None, None] * dist                                      # (Hq, q_len, k_len)


@alibi_bias.register_fake
def _(slopes, q_len, k_len):
    _check(slopes, q_len, k_len)
    return slopes.new_empty(slopes.shape[0], q_len, k_len, dtype=compute_dtype(slopes.dtype))


def _setup_context(ctx, inputs, output):
    slopes, q_len, k_len = inputs
    ctx.slopes_dtype = slopes.dtype
    ctx.q_len, ctx.k_len = q_len, k_len


def _backward(ctx, grad):
    # dL/dm_h = -sum_ij (i - j) g[h, i, j]
    dist = _distance(ctx.q_len, ctx.k_len, grad.dtype, grad.device)                 # (q_len, k_len)
    return -(grad * dist).sum((1, 2)).to(ctx.slopes_dtype), None, None


alibi_bias.register_autograd(_backward, setup_context=_setup_context)
