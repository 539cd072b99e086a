"""Triton kernel behind ``grapefx::linear_cross_entropy`` on CUDA: one pass per row of a logits chunk.

    ce_rows(logits (R, V), targets (R,) int64, scale () fp32, ignore_index, grad) -> loss (R,) fp32

Per row r with target t (MATH.md §6: the statistics in fp32, whatever the logits' dtype):

    lse_r  = log sum_j exp(z_rj)                      online max/sum over blocks of the row
    loss_r = lse_r - z_rt    (0 when t == ignore_index)
    grad:  z_rj <- scale * (exp(z_rj - lse_r) - [j == t])   written IN PLACE, in the logits' dtype
                   (0 for an ignored row)

``scale`` is 1 / (number of counted targets) read from device memory, so nothing waits on the host.
The row is read twice (statistics, then the gradient); a row of 32k bf16 logits is 64 KiB, so the
second pass mostly hits L2. Bytes: one read of the chunk (loss only) or two reads and one write.

Importing this module needs triton; ``compiler.kernels.register`` imports it where a GPU is present
and registers ``ce_rows`` with ``compiler.ops.linear_cross_entropy``, which calls it for CUDA tensors. Targets outside [0, V) other than ``ignore_index`` are not checked here (the op's
CPU path raises on them, as ``F.cross_entropy`` does).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ce_rows"]


@triton.jit
def _ce_rows_kernel(Z, stride_r, Targets, Loss, Scale, V, ignore_index,
                    BLOCK: tl.constexpr, GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = Z + row * stride_r
    t = tl.load(Targets + row)
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], -1.0e30, tl.float32)       # per-lane running max (finite: no inf - inf)
    s = tl.zeros([BLOCK], tl.float32)               # per-lane running sum of exp(z - m)
    for start in range(0, V, BLOCK):
        c = start + cols
        z = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    mx = tl.max(m, 0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
    valid = t != ignore_index
    tt = tl.where(valid, t, 0)
    zt = tl.load(base + tt).to(tl.float32)
    tl.store(Loss + row, tl.where(valid, lse - zt, 0.0))
    if GRAD:
        scale = tl.load(Scale) * valid.to(tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            z = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            p = tl.where(c == tt, p - 1.0, p)
            tl.store(base + c, (p * scale).to(Z.dtype.element_ty), mask=c < V)


def ce_rows(logits: Tensor, targets: Tensor, scale: Tensor, ignore_index: int, grad: bool) -> Tensor:
    """Per-row cross-entropy of ``logits`` (R, V), rows contiguous; with ``grad`` the logits are
    overwritten by ``scale * (softmax - onehot)``. Returns loss (R,) fp32 (0 on ignored rows)."""
    R, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("ce_rows: logits rows must be contiguous")
    loss = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R == 0:
        return loss
    block = min(4096, triton.next_power_of_2(V))
    _ce_rows_kernel[(R,)](logits, logits.stride(0), targets, loss, scale, V, ignore_index,
                          BLOCK=block, GRAD=grad, num_warps=8 if block >= 2048 else 4)
    return loss
