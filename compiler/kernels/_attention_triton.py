"""Triton kernels of the fused attention op (MATH.md §1–§3). Imported only where triton is installed.

One kernel family, specialised by constexpr flags:
- ``ROTATE``: GRAPE-M rotation of q and k in-kernel from fp32 ``theta`` (half-split pairs,
  angle = fl32(n * theta_j), the rotated vector rounded to the input dtype before the dot, exactly
  as ``grape_m_rotate`` followed by attention). cos and sin are evaluated per tile (``_sincos``)
  or, with ``TABLE``, read from a (rows, 2, HALF) fp32 table the wrapper computes once per call
  (``Theta`` then points at the table): loads in place of ~30 instructions per angle.
- ``ALIBI``: score += -slope_h * (i - j) in fp32 after the 1/sqrt(D) scaling.
- ``WINDOW``: query i sees keys i-W+1..i (W keys counting itself); off means full causal.

Flash-attention-2 layout. Scores are kept in log2 units (s2 = S * log2(e)) so softmax uses exp2;
the saved logsumexp is natural-log, fp32, (B, Hq, T). Every q tile is held as its two halves
(x1 = x[:, :D/2], x2 = x[:, D/2:]) so the rotation is elementwise and q.k = q1.k1 + q2.k2 is two
dots of depth D/2.

Kernels (grid in brackets):
- ``_fwd``      [q tiles, B*Hq]: out, lse. Key tiles visited in three phases: the window's
  partly visible tiles (masked), fully visible tiles (no mask), the diagonal tiles (causal mask);
  or, with ``ONE_LOOP``, in one loop that masks every tile (better pipelined when a row sees only
  a few tiles). Tiles entirely outside the window are never visited; the same holds for the
  backward kernels.
- ``_bwd_delta``[q tiles, B*Hq]: delta_i = sum_d dO * O (fp32).
- ``_bwd_dkdv`` [kv tiles, B*Hkv]: each program owns one K/V tile of one KV head and loops over
  the G query heads of its group and the q tiles that see it: dk, dv (no atomics, deterministic),
  partial dtheta (k side) and partial dslopes. With ``ATOMIC_DQ`` it also adds dS @ K into an
  fp32 dq accumulator (fewer matmuls, order of fp32 additions not fixed).
- ``_bwd_dq``   [q tiles, B*Hq]: dq by recomputing P and dP (deterministic), partial dtheta (q side).
- ``_bwd_dq_finish`` [q tiles, B*Hq]: with ``ATOMIC_DQ``, scales and un-rotates the accumulator,
  partial dtheta (q side).
Partial sums go to small per-tile buffers that the wrapper reduces with torch (deterministic).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# pi/2 split into three fp32 parts (Cody-Waite; their sum is pi/2 to 2e-15). PIO2_HI has 8
# significant bits and PIO2_MID 11, so the first products are exact for the angles we meet even
# without fused multiply-adds. Measured without FMA (Triton's interpreter): |error| of cos and sin
# < 1e-7 for |angle| < 1e3, < 3e-7 below 1.3e4, < 1e-6 below 1e5 rad; useless past ~1e6. The angle
# is n * theta_j, so this bounds T * max(theta) (RoPE's theta_0 = 1: T up to ~1e5).
PIO2_HI = tl.constexpr(1.5703125)
PIO2_MID = tl.constexpr(4.837512969970703125e-4)
PIO2_LO = tl.constexpr(7.54978995489188216e-8)
TWO_OVER_PI = tl.constexpr(0.6366197723675814)


@triton.jit
def _sincos(x):
    """(cos x, sin x) in fp32: reduce by pi/2 to r in [-pi/4, pi/4], Taylor polynomials, quadrant.

    One reduction serves both functions (libdevice's sinf and cosf would each do their own).
    Truncation error of the series on [-pi/4, pi/4]: sin < 2e-9, cos < 2e-10, under fp32's ulp.
    """
    j = tl.floor(x * TWO_OVER_PI + 0.5)
    r = tl.fma(j, -PIO2_LO, tl.fma(j, -PIO2_MID, tl.fma(j, -PIO2_HI, x)))
    s = r * r
    sin_r = r + r * s * (-1.6666666666666666e-1 + s * (8.333333333333333e-3 + s * (
        -1.984126984126984e-4 + s * 2.7557319223985893e-6)))
    cos_r = 1.0 + s * (-0.5 + s * (4.1666666666666664e-2 + s * (-1.388888888888889e-3 + s * (
        2.48015873015873e-5 + s * -2.755731922398589e-7))))
    quadrant = j.to(tl.int32) & 3                   # x = j * pi/2 + r; two's complement keeps j < 0 right
    swap = (quadrant & 1) != 0
    sin_v = tl.where(swap, cos_r, sin_r)
    cos_v = tl.where(swap, sin_r, cos_r)
    sin_v = tl.where((quadrant & 2) != 0, -sin_v, sin_v)
    cos_v = tl.where(((quadrant + 1) & 2) != 0, -cos_v, cos_v)
    return cos_v, sin_v


@triton.jit
def _cos_sin_tile(pos, theta, HALF: tl.constexpr):
    """cos, sin of angle[n, j] = fl32(pos[n] * theta[j]) -> (R, HALF) each, for pos (R,) int32.

    ``theta`` is either the frequencies (HALF,) fp32, evaluated here (``_sincos``), or a pointer to
    the wrapper's table (rows, 2, HALF) fp32 of [cos | sin] per position (``TABLE`` kernels), read.
    """
    if theta.dtype.is_ptr():
        ptr = theta + pos[:, None] * (2 * HALF) + tl.arange(0, HALF)[None, :]
        c = tl.load(ptr)
        s = tl.load(ptr + HALF)
    else:
        angle = pos.to(tl.float32)[:, None] * theta[None, :]
        c, s = _sincos(angle)
    return c, s


@triton.jit
def _rotate(x1, x2, c, s):
    """R(angle) x on the half-split pairs, fp32 in and out."""
    return x1 * c - x2 * s, x1 * s + x2 * c


@triton.jit
def _unrotate(g1, g2, c, s):
    """R(angle)^T g: the gradient of ``_rotate`` with respect to its input."""
    return g1 * c + g2 * s, g2 * c - g1 * s


@triton.jit
def _load_halves(base, rows, row_ok, stride_t, HALF: tl.constexpr, BOUND: tl.constexpr):
    """Rows ``rows`` of a (T, D) slab as its two halves (R, HALF) each; rows past T read 0."""
    cols = tl.arange(0, HALF)
    ptr = base + rows[:, None] * stride_t + cols[None, :]
    if BOUND:
        x1 = tl.load(ptr, mask=row_ok[:, None], other=0.0)
        x2 = tl.load(ptr + HALF, mask=row_ok[:, None], other=0.0)
    else:
        x1 = tl.load(ptr)
        x2 = tl.load(ptr + HALF)
    return x1, x2


@triton.jit
def _load_rows(base, rows, row_ok, stride_t, D: tl.constexpr, BOUND: tl.constexpr):
    """Rows of a (T, D) slab as one (R, D) tile; rows past T read 0."""
    cols = tl.arange(0, D)
    ptr = base + rows[:, None] * stride_t + cols[None, :]
    if BOUND:
        x = tl.load(ptr, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptr)
    return x


@triton.jit
def _load_rotated(base, rows, row_ok, stride_t, theta, HALF: tl.constexpr, BOUND: tl.constexpr,
                  ROTATE: tl.constexpr):
    """A q or k tile as the attention reads it: rotated at positions ``rows`` and rounded to the
    input dtype (the dot operands), as halves (R, HALF)."""
    x1, x2 = _load_halves(base, rows, row_ok, stride_t, HALF, BOUND)
    if ROTATE:
        c, s = _cos_sin_tile(rows, theta, HALF)
        r1, r2 = _rotate(x1.to(tl.float32), x2.to(tl.float32), c, s)
        x1 = r1.to(base.dtype.element_ty)
        x2 = r2.to(base.dtype.element_ty)
    return x1, x2


@triton.jit
def _visible(dist, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Mask of the visible (query i, key j) pairs, from dist = i - j (either orientation), among the
    conditions asked for."""
    if CAUSAL:
        ok = dist >= 0
        if WINDOW:
            ok = ok & (dist < window)
    else:
        ok = dist < window
    return ok


# ---------------------------------------------------------------------------------------------
# forward

@triton.jit
def _fwd_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, stride_t, theta, slope2, offs_m, start, end, T, window,
               scale2, HALF: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, BOUND: tl.constexpr, ROTATE: tl.constexpr, ALIBI: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Online softmax over key tiles [start, end) step BLOCK_N; masks only what (CAUSAL, WINDOW) ask."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < T
        k1, k2 = _load_rotated(k_base, offs_n, key_ok, stride_t, theta, HALF, BOUND, ROTATE)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)          # (BM, BN) q.k
        s = s * scale2
        if ALIBI:
            s = s - slope2 * (offs_m[:, None] - offs_n[None, :]).to(tl.float32)
        if CAUSAL or WINDOW:
            s = tl.where(_visible(offs_m[:, None] - offs_n[None, :], window, CAUSAL, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))       # m_i starts finite: an all-masked row keeps alpha = 1
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, key_ok, stride_t, D, BOUND)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd(Q, K, V, Theta, Slopes, Out, Lse,
         sq_b, sq_h, sk_b, sk_h, stride_tq, stride_tk, T, H, G, window, scale2, NB_WIN, NB_FULL,
         HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         ROTATE: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr, ONE_LOOP: tl.constexpr,
         DOT_PREC: tl.constexpr, TABLE: tl.constexpr = False):
    D: tl.constexpr = 2 * HALF
    # float arguments arrive as fp64 when Inductor launches the kernel (torch.compile), as fp32 otherwise
    scale2 = tl.cast(scale2, tl.float32)
    pid_m = tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(0)           # longest (causal) rows launch first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    k_base = K + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_base = V + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    theta = (Theta if TABLE else tl.load(Theta + tl.arange(0, HALF))) if ROTATE else None
    slope2 = tl.load(Slopes + h) * LOG2E if ALIBI else 0.0

    q1, q2 = _load_rotated(q_base, offs_m, row_ok, stride_tq, theta, HALF, True, ROTATE)   # (BM, HALF) x2
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    lo = tl.maximum(m0 - NB_WIN * BLOCK_N, 0) if WINDOW else 0
    hi = tl.minimum(m0 + BLOCK_M, T)
    if ONE_LOOP:      # one pipelined loop, every tile masked (few tiles per row: sliding windows)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, stride_tk, theta, slope2, offs_m,
                                   lo, hi, T, window, scale2, HALF, D, BLOCK_N, True, WINDOW, True,
                                   ROTATE, ALIBI, DOT_PREC)
    else:             # window-edge tiles (masked), fully visible tiles (no mask), diagonal tiles (masked)
        full_lo = tl.maximum(m0 - NB_FULL * BLOCK_N, 0) if WINDOW else 0
        if WINDOW:
            acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, stride_tk, theta, slope2, offs_m,
                                       lo, full_lo, T, window, scale2, HALF, D, BLOCK_N, False, True, False,
                                       ROTATE, ALIBI, DOT_PREC)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, stride_tk, theta, slope2, offs_m,
                                   full_lo, m0, T, window, scale2, HALF, D, BLOCK_N, False, False, False,
                                   ROTATE, ALIBI, DOT_PREC)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q1, q2, k_base, v_base, stride_tk, theta, slope2, offs_m,
                                   m0, hi, T, window, scale2, HALF, D, BLOCK_N, True, WINDOW, True,
                                   ROTATE, ALIBI, DOT_PREC)
    out = acc / l_i[:, None]
    cols = tl.arange(0, D)
    o_base = Out + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    tl.store(o_base + offs_m[:, None] * stride_tq + cols[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(Lse + bh.to(tl.int64) * T + offs_m, (m_i + tl.math.log2(l_i)) * LN2, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# backward

@triton.jit
def _bwd_delta(Out, DO, Delta, sq_b, sq_h, stride_t, T, H,
               D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO[i, d] * O[i, d] in fp32 (the rowsum term of dS = P * (dP - delta))."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    off = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    o = _load_rows(Out + off, offs_m, row_ok, stride_t, D, True).to(tl.float32)
    do = _load_rows(DO + off, offs_m, row_ok, stride_t, D, True).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_tiles(dk1, dk2, dv, dsl, k1, k2, v, q_base, do_base, lse_base, delta_base, dqa_base, stride_t, theta,
                slope2, offs_n, start, end, T, window, scale2,
                HALF: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, ROTATE: tl.constexpr, ALIBI: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                NEED_DSLOPES: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate over q tiles [start, end) step BLOCK_M into one K/V tile's dk (halves), dv and the
    dslopes row sums. Everything is transposed (rows = keys) so P^T and dS^T feed the dots directly."""
    cols_h = tl.arange(0, HALF)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q1, q2 = _load_rotated(q_base, offs_m, row_ok, stride_t, theta, HALF, True, ROTATE)
        do = _load_rows(do_base, offs_m, row_ok, stride_t, D, True)                     # (BM, D)
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E      # rows past T: P = 0
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
        st = tl.dot(k2, tl.trans(q2), st, input_precision=DOT_PREC)                   # (BN, BM) k.q
        st = st * scale2
        dist_t = offs_m[None, :] - offs_n[:, None]                                    # (BN, BM) i - j
        if ALIBI:
            st = st - slope2 * dist_t.to(tl.float32)
        pt = tl.math.exp2(st - lse2[None, :])
        if CAUSAL or WINDOW:
            pt = tl.where(_visible(dist_t, window, CAUSAL, WINDOW), pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)                        # (BN, BM) v.dO
        dst = pt * (dpt - delta[None, :])                                             # dL/dS^T
        if NEED_DSLOPES:
            dsl -= tl.sum(dst * dist_t.to(tl.float32), 1)                             # dS/dm_h = -(i - j)
        dst_c = dst.to(q1.dtype)
        dk1 = tl.dot(dst_c, q1, dk1, input_precision=DOT_PREC)
        dk2 = tl.dot(dst_c, q2, dk2, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            ds_c = tl.trans(dst_c)                                                    # (BM, BN)
            dq_ptr = dqa_base + offs_m[:, None] * D + cols_h[None, :]
            tl.atomic_add(dq_ptr, tl.dot(ds_c, k1, input_precision=DOT_PREC), mask=row_ok[:, None], sem="relaxed")
            tl.atomic_add(dq_ptr + HALF, tl.dot(ds_c, k2, input_precision=DOT_PREC), mask=row_ok[:, None],
                          sem="relaxed")
    return dk1, dk2, dv, dsl


@triton.jit
def _bwd_dkdv(Q, K, V, DO, Lse, Delta, Theta, Slopes, DK, DV, DQacc, DThetaK, DSlopes,
              sq_b, sq_h, sk_b, sk_h, stride_tq, stride_tk, T, H, Hkv, G, window, scale, scale2, N_FULL_Q,
              HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ROTATE: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr, ATOMIC_DQ: tl.constexpr,
              NEED_DTHETA: tl.constexpr, NEED_DSLOPES: tl.constexpr, ONE_LOOP: tl.constexpr,
              DOT_PREC: tl.constexpr, TABLE: tl.constexpr = False):
    D: tl.constexpr = 2 * HALF
    # float arguments arrive as fp64 when Inductor launches the kernel (torch.compile), as fp32 otherwise
    scale, scale2 = tl.cast(scale, tl.float32), tl.cast(scale2, tl.float32)
    pid_n = tl.program_id(0)                                     # low key tiles see the most queries: first
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < T
    cols_h = tl.arange(0, HALF)
    theta = (Theta if TABLE else tl.load(Theta + cols_h)) if ROTATE else None
    k_off = b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    # the rotated k tile as the dots read it; its fp32 rotation and cos/sin are rebuilt after the
    # loop (keeping them live through it costs 64 registers a thread and spills)
    k1, k2 = _load_rotated(K + k_off, offs_n, key_ok, stride_tk, theta, HALF, True, ROTATE)   # (BN, HALF) x2
    v = _load_rows(V + k_off, offs_n, key_ok, stride_tk, D, True)                         # (BN, D)

    diag_end = tl.minimum(n0 + BLOCK_N, T)
    full_end = tl.minimum(n0 + BLOCK_N + N_FULL_Q * BLOCK_M, T) if WINDOW else T
    q_end = tl.minimum(n0 + BLOCK_N + window - 1, T) if WINDOW else T   # 1 + the last query seeing key n0+BN-1
    dk1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        q_off = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        q_base = Q + q_off
        do_base = DO + q_off
        lse_base = Lse + bh.to(tl.int64) * T
        delta_base = Delta + bh.to(tl.int64) * T
        dqa_base = DQacc + q_off if ATOMIC_DQ else DQacc
        slope2 = tl.load(Slopes + h) * LOG2E if ALIBI else 0.0
        dsl = tl.zeros([BLOCK_N], dtype=tl.float32)
        if ONE_LOOP:
            dk1, dk2, dv, dsl = _dkdv_tiles(dk1, dk2, dv, dsl, k1, k2, v, q_base, do_base, lse_base, delta_base,
                                            dqa_base, stride_tq, theta, slope2, offs_n, n0,
                                            q_end, T, window, scale2, HALF, D, BLOCK_M, True,
                                            WINDOW, ROTATE, ALIBI, ATOMIC_DQ, NEED_DSLOPES, DOT_PREC)
        else:
            dk1, dk2, dv, dsl = _dkdv_tiles(dk1, dk2, dv, dsl, k1, k2, v, q_base, do_base, lse_base, delta_base,
                                            dqa_base, stride_tq, theta, slope2, offs_n, n0, diag_end, T, window,
                                            scale2, HALF, D, BLOCK_M, True, WINDOW, ROTATE, ALIBI, ATOMIC_DQ,
                                            NEED_DSLOPES, DOT_PREC)
            dk1, dk2, dv, dsl = _dkdv_tiles(dk1, dk2, dv, dsl, k1, k2, v, q_base, do_base, lse_base, delta_base,
                                            dqa_base, stride_tq, theta, slope2, offs_n, n0 + BLOCK_N, full_end, T,
                                            window, scale2, HALF, D, BLOCK_M, False, False, ROTATE, ALIBI,
                                            ATOMIC_DQ, NEED_DSLOPES, DOT_PREC)
            if WINDOW:
                dk1, dk2, dv, dsl = _dkdv_tiles(dk1, dk2, dv, dsl, k1, k2, v, q_base, do_base, lse_base,
                                                delta_base, dqa_base, stride_tq, theta, slope2, offs_n, full_end,
                                                q_end, T, window, scale2, HALF, D, BLOCK_M, False, True, ROTATE,
                                                ALIBI, ATOMIC_DQ, NEED_DSLOPES, DOT_PREC)
        if NEED_DSLOPES:
            tl.store(DSlopes + bh.to(tl.int64) * tl.cdiv(T, BLOCK_N) + pid_n, tl.sum(dsl, 0))

    dk1 = dk1 * scale                                            # dL/d(rotated k), fp32
    dk2 = dk2 * scale
    if ROTATE:
        ck, sk = _cos_sin_tile(offs_n, theta, HALF)
        if NEED_DTHETA:
            x1, x2 = _load_halves(K + k_off, offs_n, key_ok, stride_tk, HALF, True)
            kr1, kr2 = _rotate(x1.to(tl.float32), x2.to(tl.float32), ck, sk)
            n = offs_n.to(tl.float32)[:, None]                   # rows past T have k = 0: they add 0
            part = tl.sum(n * (dk2 * kr1 - dk1 * kr2), 0)        # (HALF,)
            tl.store(DThetaK + (bhk.to(tl.int64) * tl.cdiv(T, BLOCK_N) + pid_n) * HALF + cols_h, part)
        dk1, dk2 = _unrotate(dk1, dk2, ck, sk)
    ptr = offs_n[:, None] * stride_tk + cols_h[None, :]
    tl.store(DK + k_off + ptr, dk1.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DK + k_off + ptr + HALF, dk2.to(DK.dtype.element_ty), mask=key_ok[:, None])
    cols = tl.arange(0, D)
    tl.store(DV + k_off + offs_n[:, None] * stride_tk + cols[None, :], dv.to(DV.dtype.element_ty),
             mask=key_ok[:, None])


@triton.jit
def _dq_tiles(dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, stride_t, theta, slope2, offs_m, start, end, T,
              window, scale2, HALF: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr, BOUND: tl.constexpr, ROTATE: tl.constexpr, ALIBI: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """Accumulate dS @ K (halves) over key tiles [start, end) step BLOCK_N for one q tile."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < T
        k1, k2 = _load_rotated(k_base, offs_n, key_ok, stride_t, theta, HALF, BOUND, ROTATE)
        v = _load_rows(v_base, offs_n, key_ok, stride_t, D, BOUND)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
        s = s * scale2
        if ALIBI:
            s = s - slope2 * (offs_m[:, None] - offs_n[None, :]).to(tl.float32)
        p = tl.math.exp2(s - lse2[:, None])
        if CAUSAL or WINDOW:
            p = tl.where(_visible(offs_m[:, None] - offs_n[None, :], window, CAUSAL, WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)                         # (BM, BN)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq1, dq2


@triton.jit
def _dq_store(dq1, dq2, Q, DQ, DThetaQ, q_off, offs_m, row_ok, stride_t, theta, pid_m, bh, n_tiles,
              HALF: tl.constexpr, ROTATE: tl.constexpr, NEED_DTHETA: tl.constexpr):
    """dq1, dq2 = dL/d(rotated q) (fp32, scaled): q-side dtheta partial, un-rotate, store."""
    cols_h = tl.arange(0, HALF)
    if ROTATE:
        q1, q2 = _load_halves(Q + q_off, offs_m, row_ok, stride_t, HALF, True)
        c, s = _cos_sin_tile(offs_m, theta, HALF)
        if NEED_DTHETA:
            r1, r2 = _rotate(q1.to(tl.float32), q2.to(tl.float32), c, s)
            n = offs_m.to(tl.float32)[:, None]
            part = tl.sum(n * (dq2 * r1 - dq1 * r2), 0)
            tl.store(DThetaQ + (bh.to(tl.int64) * n_tiles + pid_m) * HALF + cols_h, part)
        dq1, dq2 = _unrotate(dq1, dq2, c, s)
    ptr = DQ + q_off + offs_m[:, None] * stride_t + cols_h[None, :]
    tl.store(ptr, dq1.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(ptr + HALF, dq2.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_dq(Q, K, V, DO, Lse, Delta, Theta, Slopes, DQ, DThetaQ,
            sq_b, sq_h, sk_b, sk_h, stride_tq, stride_tk, T, H, G, window, scale, scale2, NB_WIN, NB_FULL,
            HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            ROTATE: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr, NEED_DTHETA: tl.constexpr,
            ONE_LOOP: tl.constexpr, DOT_PREC: tl.constexpr, TABLE: tl.constexpr = False):
    D: tl.constexpr = 2 * HALF
    # float arguments arrive as fp64 when Inductor launches the kernel (torch.compile), as fp32 otherwise
    scale, scale2 = tl.cast(scale, tl.float32), tl.cast(scale2, tl.float32)
    pid_m = tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q_off = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    k_base = K + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_base = V + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    theta = (Theta if TABLE else tl.load(Theta + tl.arange(0, HALF))) if ROTATE else None
    slope2 = tl.load(Slopes + h) * LOG2E if ALIBI else 0.0

    q1, q2 = _load_rotated(Q + q_off, offs_m, row_ok, stride_tq, theta, HALF, True, ROTATE)
    do = _load_rows(DO + q_off, offs_m, row_ok, stride_tq, D, True)
    lse2 = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    dq1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    lo = tl.maximum(m0 - NB_WIN * BLOCK_N, 0) if WINDOW else 0
    hi = tl.minimum(m0 + BLOCK_M, T)
    if ONE_LOOP:
        dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, stride_tk, theta, slope2, offs_m,
                             lo, hi, T, window, scale2, HALF, D, BLOCK_N, True, WINDOW, True, ROTATE, ALIBI,
                             DOT_PREC)
    else:
        full_lo = tl.maximum(m0 - NB_FULL * BLOCK_N, 0) if WINDOW else 0
        if WINDOW:
            dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, stride_tk, theta, slope2,
                                 offs_m, lo, full_lo, T, window, scale2, HALF, D, BLOCK_N, False, True, False,
                                 ROTATE, ALIBI, DOT_PREC)
        dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, stride_tk, theta, slope2, offs_m,
                             full_lo, m0, T, window, scale2, HALF, D, BLOCK_N, False, False, False, ROTATE, ALIBI,
                             DOT_PREC)
        dq1, dq2 = _dq_tiles(dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, stride_tk, theta, slope2, offs_m,
                             m0, hi, T, window, scale2, HALF, D, BLOCK_N, True, WINDOW, True, ROTATE, ALIBI,
                             DOT_PREC)
    _dq_store(dq1 * scale, dq2 * scale, Q, DQ, DThetaQ, q_off, offs_m, row_ok, stride_tq, theta, pid_m, bh,
              tl.cdiv(T, BLOCK_M), HALF, ROTATE, NEED_DTHETA)


@triton.jit
def _bwd_dq_finish(Q, DQacc, Theta, DQ, DThetaQ, sq_b, sq_h, stride_t, T, H, scale,
                   HALF: tl.constexpr, BLOCK_M: tl.constexpr, ROTATE: tl.constexpr, NEED_DTHETA: tl.constexpr,
                   TABLE: tl.constexpr = False):
    """ATOMIC_DQ: dq = R^T (scale * accumulator), cast; the q-side dtheta partial."""
    D: tl.constexpr = 2 * HALF
    # float arguments arrive as fp64 when Inductor launches the kernel (torch.compile), as fp32 otherwise
    scale = tl.cast(scale, tl.float32)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q_off = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    theta = (Theta if TABLE else tl.load(Theta + tl.arange(0, HALF))) if ROTATE else None
    dq1, dq2 = _load_halves(DQacc + bh.to(tl.int64) * T * D, offs_m, row_ok, D, HALF, True)
    _dq_store(dq1 * scale, dq2 * scale, Q, DQ, DThetaQ, q_off, offs_m, row_ok, stride_t, theta, pid_m, bh,
              tl.cdiv(T, BLOCK_M), HALF, ROTATE, NEED_DTHETA)
