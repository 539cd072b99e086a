"""Triton kernels of the lean expert path (``compiler.ops.experts``, CUDA): the elementwise work around
the grouped GEMMs, each one pass over its rows.

Rows r are the N*K (token, slot) assignments sorted by expert; ``gu`` (R, 2F) holds [a | b] =
[x W_gate | x W_up] of each row (one grouped GEMM over the concatenated weights).

    swiglu_fwd(gu)                   -> h (R, F) = silu(a) * b
    gather_sum(src, pos, gates, K)   -> out (N, C): out[t] = sum_k gates[t, k] * src[pos[t*K + k]]
                                        (gates None: weight 1); fp32 accumulation, one rounding
    swiglu_bwd(gu, u, g)             -> dgu (R, 2F), hg (R, F), dgate (R,) fp32, where u = dy W_down^T:
        h = silu(a) b;  dgate = u . h;  dh = g u;  da = dh b sigma(a) (1 + a (1 - sigma(a)));
        db = dh silu(a);  hg = g h  (the left factor of dW_down = hg^T dy)

and, from ``compiler.kernels.grouped_gemm``, the grouped GEMMs that read their rows in place:
``rows_mm_swiglu`` (the first GEMM with SwiGLU in its epilogue), ``rows_mm`` and ``weight_mm``.

All math in fp32, outputs in the inputs' dtype. ``pos`` is the inverse of the sort: row of
assignment t*K + k. Importing this module needs triton; ``compiler.kernels.register`` imports it where a GPU
is present and registers it with ``compiler.ops.experts``, which calls it only for CUDA tensors.
Launches go through ``compiler.kernels.launch``: inside the ``triton_op``s of
``compiler.kernels.moe_ops`` torch.compile records them (``wrap_triton``) and Inductor issues them
from its generated code.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from compiler.kernels import launch
from compiler.kernels.grouped_gemm import ROWS_DEPTH_MULTIPLE, rows_mm, rows_mm_swiglu, weight_mm

__all__ = ["swiglu_fwd", "swiglu_bwd", "gather_sum", "rows_mm", "rows_mm_swiglu", "weight_mm", "ROWS_DEPTH_MULTIPLE"]


@triton.jit
def _swiglu_fwd_kernel(GU, H, F, stride_gu, stride_h, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = f < F
    a = tl.load(GU + row * stride_gu + f, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(GU + row * stride_gu + F + f, mask=ok, other=0.0).to(tl.float32)
    h = a * tl.sigmoid(a) * b
    tl.store(H + row * stride_h + f, h.to(H.dtype.element_ty), mask=ok)


@triton.jit
def _gather_sum_kernel(Src, Pos, Gates, Out, C, stride_src, stride_out,
                       K: tl.constexpr, HAS_GATES: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < C
    acc = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(K):
        r = tl.load(Pos + t * K + k).to(tl.int64)
        v = tl.load(Src + r * stride_src + c, mask=ok, other=0.0).to(tl.float32)
        if HAS_GATES:
            v = v * tl.load(Gates + t * K + k).to(tl.float32)
        acc += v
    tl.store(Out + t * stride_out + c, acc.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(GU, U, G, DGU, HG, DGate, F, stride_gu, stride_u, stride_dgu, stride_hg,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(G + row).to(tl.float32)
    dot = tl.zeros([BLOCK], tl.float32)
    for f0 in range(0, F, BLOCK):
        f = f0 + tl.arange(0, BLOCK)
        ok = f < F
        a = tl.load(GU + row * stride_gu + f, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(GU + row * stride_gu + F + f, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + f, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        sa = a * sig
        h = sa * b
        dot += u * h
        dh = g * u
        da = dh * b * sig * (1.0 + a * (1.0 - sig))
        db = dh * sa
        tl.store(DGU + row * stride_dgu + f, da.to(DGU.dtype.element_ty), mask=ok)
        tl.store(DGU + row * stride_dgu + F + f, db.to(DGU.dtype.element_ty), mask=ok)
        tl.store(HG + row * stride_hg + f, (g * h).to(HG.dtype.element_ty), mask=ok)
    tl.store(DGate + row, tl.sum(dot, 0))


def _block(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(n, 16)))


def swiglu_fwd(gu: Tensor) -> Tensor:
    R, F2 = gu.shape
    F = F2 // 2
    h = gu.new_empty(R, F)
    if R:
        block = _block(F, 1024)
        launch(_swiglu_fwd_kernel)[(R, triton.cdiv(F, block))](gu, h, F, gu.stride(0), h.stride(0), BLOCK=block,
                                                              num_warps=4)
    return h


def gather_sum(src: Tensor, pos: Tensor, gates: Tensor | None, K: int) -> Tensor:
    R, C = src.shape
    N = R // K
    out = src.new_empty(N, C)
    if N:
        block = _block(C, 1024)
        launch(_gather_sum_kernel)[(N, triton.cdiv(C, block))](src, pos, src if gates is None else gates, out, C,
                                                              src.stride(0), out.stride(0), K=K,
                                                              HAS_GATES=gates is not None, BLOCK=block, num_warps=4)
    return out


def swiglu_bwd(gu: Tensor, u: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    R, F2 = gu.shape
    F = F2 // 2
    dgu, hg = torch.empty_like(gu), gu.new_empty(R, F)
    dgate = torch.empty(R, dtype=torch.float32, device=gu.device)
    if R:
        launch(_swiglu_bwd_kernel)[(R,)](gu, u, g, dgu, hg, dgate, F, gu.stride(0), u.stride(0), dgu.stride(0),
                                         hg.stride(0), BLOCK=_block(F, 1024), num_warps=4)
    return dgu, hg, dgate
