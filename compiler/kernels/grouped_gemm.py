"""Triton grouped GEMMs of the expert step that read their rows where they lie (no gathered copy).

Rows r = 0..R-1 are the (token, slot) assignments sorted by expert; ``offs`` (E,) int32 holds the
cumulative group ends (expert e owns rows offs[e-1]..offs[e]-1, possibly none); ``src`` (R,) the
row of the source matrix each sorted row reads (``order // K``: its token), or None where the
source is already in sorted order.

    rows_mm(a, src, offs, w)              -> out (R, N):   out[r] = a[src[r]] @ w[e(r)]
    rows_mm_swiglu(a, src, offs, wg, wu)  -> gu (R, 2F), h (R, F): [a | b] = a[src[r]] @ [wg | wu][e(r)],
                                             h = silu(a) * b in the epilogue (fp32, rounded once)
    weight_mm(a, a_src, b, b_src, offs, out1, out2=None)
                                          -> out[e] = sum over e's rows of a[a_src[r]]^T b[b_src[r]]
                                             (E, I, O); with out2, columns < O/2 go to out1 and the
                                             rest to out2 (W_gate | W_up gradients without a split copy)

``w`` may be any strided view (W_down^T is a transposed view). fp32 accumulation, outputs rounded to
the operands' dtype (``weight_mm`` stores them in its outputs' dtype: fp32 gradients of fp32 masters).
A forward program owns one BM x BN tile of one expert; its expert comes from the offsets in the kernel
(tiles per expert = ceil(rows / BM), scanned with a cumulative sum), so the launch grid is an upper
bound, cdiv(R, BM) + E tiles, and the surplus programs return at once: no host synchronisation. A
weight-gradient program owns one BI x BO tile of one expert's gradient and runs over that expert's rows
BR at a time (an expert without rows writes zeros), reading each chunk's source-row indices one chunk
ahead so that Triton pipelines its operand loads as deep as num_stages (``compiler.kernels.pipelining``
reads that from the compiled IR). Tile shapes are autotuned per shape at first use (Triton's autotuner:
a few seconds in the first step).

Why: on baseline.yaml (64 experts of 256, top-6, 16,384 tokens, one H100) the gathered copies, the
concatenated weights and the split gradient cost as much as the GEMMs beside them; reading in place
made the expert step's four GEMMs 1.4-2.0x faster each, the training step 3% faster and its peak
memory 6 GiB lower (``bench/grouped_gemm.py``, ``bench/RESULTS.md``). The second forward GEMM and the
input gradient stay on ``torch._grouped_mm``, which is faster there (their rows are already in order).
"""

import triton
import triton.language as tl
from torch import Tensor

from compiler.kernels import launch

__all__ = ["rows_mm", "rows_mm_swiglu", "weight_mm", "ROWS_DEPTH_MULTIPLE"]

ROWS_DEPTH_MULTIPLE = 64        # the rows GEMMs' K tile: the depth of their products must be a multiple of it

# autotuned tiles: the fastest of ``bench/grouped_gemm.py --sweep`` on one H100 (bench/RESULTS.md, 2026-12-06),
# timed on balanced routing and on routing as a fresh router makes it (three experts take every token; the
# autotuner tunes in the first step, on that routing). Forward tiles: 128 x 128 with 8 warps and 4 stages is
# the SwiGLU GEMM's best (235 us; its 128 x 256 tiles need more shared memory than there is), 128 x 256 with
# 4 stages u = dy W_down^T's (125 us). Weight-gradient tiles: 128 x 256 over 64-row chunks is dW_gate | dW_up's
# best (226 us), 128 x 128 over 128-row chunks dW_down's on the fresh router's routing (145 us against 179 us
# for the best 64-row tile, which is 124 us on balanced routing)
_FWD_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": ROWS_DEPTH_MULTIPLE}, num_warps=w, num_stages=s)
                for bm, bn, w, s in ((128, 128, 8, 4), (128, 128, 8, 3), (128, 256, 8, 4), (128, 256, 8, 3),
                                     (128, 128, 4, 4), (64, 128, 4, 4))]
_WGRAD_CONFIGS = [triton.Config({"BI": bi, "BO": bo, "BR": br}, num_warps=w, num_stages=s)
                  for bi, bo, br, w, s in ((128, 256, 64, 8, 3), (128, 128, 128, 4, 3), (128, 128, 128, 8, 3),
                                           (128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 4, 4))]


@triton.jit
def _expert_tile(pid_m, Offs, E: tl.constexpr, E_P2: tl.constexpr, BM: tl.constexpr):
    """(e, first row, end row) of the pid_m-th m-tile over all experts; e == E past the last tile."""
    idx = tl.arange(0, E_P2)
    ends = tl.load(Offs + idx, mask=idx < E, other=0)
    starts = tl.load(Offs + idx - 1, mask=(idx > 0) & (idx < E), other=0)
    ends = tl.where(idx < E, ends, starts)                                    # padded experts: no rows
    tiles = (ends - starts + BM - 1) // BM
    tile_end = tl.cumsum(tiles, 0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)                         # experts wholly before
    here = idx == e
    first_tile = tl.sum(tl.where(here, tile_end - tiles, 0), 0)
    row0 = tl.sum(tl.where(here, starts, 0), 0) + (pid_m - first_tile) * BM
    row_end = tl.sum(tl.where(here, ends, 0), 0)
    return e, row0, row_end


@triton.jit
def _rows_kernel(A, Src, W1, W2, Out, H, Offs, K1, N_OUT, stride_a, stride_o, stride_h,
                 s1e, s1k, s1n, s2e, s2k, s2n,
                 E: tl.constexpr, E_P2: tl.constexpr, GATHER: tl.constexpr, SWIGLU: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, row0, row_end = _expert_tile(pid_m, Offs, E, E_P2, BM)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < row_end
    if GATHER:
        src = tl.load(Src + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N_OUT
    ks = tl.arange(0, BK)
    e64 = e.to(tl.int64)
    a_ptr = A + src[:, None] * stride_a + ks[None, :]
    w1_ptr = W1 + e64 * s1e + ks[:, None] * s1k + cols[None, :] * s1n
    acc1 = tl.zeros((BM, BN), tl.float32)
    if SWIGLU:
        w2_ptr = W2 + e64 * s2e + ks[:, None] * s2k + cols[None, :] * s2n
        acc2 = tl.zeros((BM, BN), tl.float32)
        for _ in range(0, K1, BK):
            a = tl.load(a_ptr, mask=row_ok[:, None], other=0.0)
            acc1 = tl.dot(a, tl.load(w1_ptr, mask=col_ok[None, :], other=0.0), acc1)
            acc2 = tl.dot(a, tl.load(w2_ptr, mask=col_ok[None, :], other=0.0), acc2)
            a_ptr += BK
            w1_ptr += BK * s1k
            w2_ptr += BK * s2k
    else:
        for _ in range(0, K1, BK):
            a = tl.load(a_ptr, mask=row_ok[:, None], other=0.0)
            acc1 = tl.dot(a, tl.load(w1_ptr, mask=col_ok[None, :], other=0.0), acc1)
            a_ptr += BK
            w1_ptr += BK * s1k
    rows64 = rows.to(tl.int64)
    ok = row_ok[:, None] & col_ok[None, :]
    o_ptr = Out + rows64[:, None] * stride_o + cols[None, :]
    ty = Out.dtype.element_ty
    if SWIGLU:
        a_r = acc1.to(ty)                                 # gu as stored; h from the rounded values,
        b_r = acc2.to(ty)                                 # as a separate SwiGLU pass over gu would
        tl.store(o_ptr, a_r, mask=ok)
        tl.store(o_ptr + N_OUT, b_r, mask=ok)
        a32 = a_r.to(tl.float32)
        h = a32 * tl.sigmoid(a32) * b_r.to(tl.float32)
        tl.store(H + rows64[:, None] * stride_h + cols[None, :], h.to(ty), mask=ok)
    else:
        tl.store(o_ptr, acc1.to(ty), mask=ok)


@triton.jit
def _source_rows(Src, rows, end, GATHER: tl.constexpr):
    """int64 row of the source matrix for each sorted row (``Src[rows]``, or the rows themselves)."""
    if GATHER:
        return tl.load(Src + rows, mask=rows < end, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _weight_kernel(A, ASrc, B, BSrc, Out1, Out2, Offs, I, O, O_SPLIT, stride_a, stride_b,
                   so1e, so1i, so2e, so2i,
                   GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SPLIT: tl.constexpr,
                   BI: tl.constexpr, BO: tl.constexpr, BR: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    tiles_i = tl.cdiv(I, BI)
    ti = pid % tiles_i
    to = pid // tiles_i
    r0 = tl.load(Offs + e - 1, mask=e > 0, other=0)
    r1 = tl.load(Offs + e)
    ii = ti * BI + tl.arange(0, BI)
    oo = to * BO + tl.arange(0, BO)
    i_ok = ii < I
    o_ok = oo < O
    rr = tl.arange(0, BR)
    acc = tl.zeros((BI, BO), tl.float32)                                      # a^T (BI, BR) @ b (BR, BO)
    # each chunk's source rows are read one chunk ahead, so that no load feeds another load of the
    # same iteration: Triton then pipelines the operand loads num_stages deep (with the index load
    # in the same iteration it kept two buffers whatever num_stages said)
    sa_next = _source_rows(ASrc, r0 + rr, r1, GATHER_A)
    sb_next = _source_rows(BSrc, r0 + rr, r1, GATHER_B)
    for r in range(r0, r1, BR):
        rows = r + rr
        ok = rows < r1
        sa, sb = sa_next, sb_next
        sa_next = _source_rows(ASrc, rows + BR, r1, GATHER_A)
        sb_next = _source_rows(BSrc, rows + BR, r1, GATHER_B)
        a_t = tl.load(A + ii[:, None] + sa[None, :] * stride_a, mask=i_ok[:, None] & ok[None, :], other=0.0)
        b = tl.load(B + sb[:, None] * stride_b + oo[None, :], mask=ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(a_t, b, acc)
    e64 = e.to(tl.int64)
    ok = i_ok[:, None] & o_ok[None, :]
    val = acc.to(A.dtype.element_ty).to(Out1.dtype.element_ty)               # rounded to the operands' dtype
    if SPLIT:                                                                 # columns < O_SPLIT to Out1, the rest to Out2
        first = oo < O_SPLIT
        tl.store(Out1 + e64 * so1e + ii[:, None] * so1i + oo[None, :], val, mask=ok & first[None, :])
        tl.store(Out2 + e64 * so2e + ii[:, None] * so2i + (oo - O_SPLIT)[None, :], val, mask=ok & ~first[None, :])
    else:
        tl.store(Out1 + e64 * so1e + ii[:, None] * so1i + oo[None, :], val, mask=ok)


# one autotuner per use (keys hold only runtime arguments: the variant's constexprs pick the tuner)
_rows_tuned = triton.autotune(_FWD_CONFIGS, key=["K1", "N_OUT"])(_rows_kernel)
_swiglu_tuned = triton.autotune(_FWD_CONFIGS, key=["K1", "N_OUT"])(_rows_kernel)
_weight_tuned = triton.autotune(_WGRAD_CONFIGS, key=["I", "O", "O_SPLIT"])(_weight_kernel)


def _check_rows(a: Tensor, K1: int) -> None:
    if a.stride(-1) != 1 or K1 % ROWS_DEPTH_MULTIPLE:
        raise ValueError(f"grouped_gemm: the rows must be contiguous and their depth a multiple of {ROWS_DEPTH_MULTIPLE}; "
                         f"got {tuple(a.shape)} with strides {a.stride()}")


def _rows(tuned, a, src, offs, w1, w2, out, h, K1, n_out):
    E = offs.numel()
    R = out.shape[0]
    w2 = w1 if w2 is None else w2
    if R == 0:
        return

    def grid(meta):
        return triton.cdiv(n_out, meta["BN"]), triton.cdiv(R, meta["BM"]) + E

    launch(tuned)[grid](a, a if src is None else src, w1, w2, out, out if h is None else h, offs,
                        K1, n_out, a.stride(0), out.stride(0), out.stride(0) if h is None else h.stride(0),
                        *w1.stride(), *w2.stride(), E=E, E_P2=triton.next_power_of_2(E),
                        GATHER=src is not None, SWIGLU=h is not None)


def rows_mm(a: Tensor, src: Tensor | None, offs: Tensor, w: Tensor) -> Tensor:
    """out (R, N) = a[src[r]] @ w[e(r)]; a (*, K), w (E, K, N) any strides, R = len(src) or len(a)."""
    R = a.shape[0] if src is None else src.shape[0]
    _check_rows(a, w.shape[1])
    out = a.new_empty(R, w.shape[2])
    _rows(_rows_tuned, a, src, offs, w, None, out, None, w.shape[1], w.shape[2])
    return out


def rows_mm_swiglu(a: Tensor, src: Tensor | None, offs: Tensor, w_gate: Tensor, w_up: Tensor) -> tuple[Tensor, Tensor]:
    """(gu (R, 2F), h (R, F)): gu = a[src[r]] @ [w_gate | w_up][e(r)], h = silu(gu[:, :F]) * gu[:, F:]."""
    R = a.shape[0] if src is None else src.shape[0]
    F_ = w_gate.shape[2]
    _check_rows(a, w_gate.shape[1])
    gu, h = a.new_empty(R, 2 * F_), a.new_empty(R, F_)
    _rows(_swiglu_tuned, a, src, offs, w_gate, w_up, gu, h, w_gate.shape[1], F_)
    return gu, h


def weight_mm(a: Tensor, a_src: Tensor | None, b: Tensor, b_src: Tensor | None, offs: Tensor,
              out1: Tensor, out2: Tensor | None = None) -> None:
    """out[e] = sum over e's sorted rows r of a[a_src[r]]^T b[b_src[r]], written into out1 (E, I, O)
    (or, with out2, columns < O/2 into out1 and the rest into out2, each (E, I, O/2))."""
    E, I = offs.numel(), a.shape[1]
    O = b.shape[1]
    if a.stride(-1) != 1 or b.stride(-1) != 1 or out1.stride(-1) != 1:
        raise ValueError("grouped_gemm.weight_mm: the operands' and outputs' rows must be contiguous")
    split = out2 is not None
    o_split = O // 2 if split else O
    o2 = out1 if out2 is None else out2

    def grid(meta):
        return triton.cdiv(I, meta["BI"]) * triton.cdiv(O, meta["BO"]), E

    launch(_weight_tuned)[grid](a, a if a_src is None else a_src, b, b if b_src is None else b_src, out1, o2, offs,
                                I, O, o_split, a.stride(0), b.stride(0), out1.stride(0), out1.stride(1),
                                o2.stride(0), o2.stride(1), GATHER_A=a_src is not None,
                                GATHER_B=b_src is not None, SPLIT=split)
