"""The attention chain after q, k, v, shared by every mechanism (GQA ``attention.py``, TPA ``tpa.py``),
and the position signals it uses: rotation frequencies theta and ALiBi slopes.

    scores    = (q_g @ k^T).float() * 1/sqrt(D)               (B, Hkv, G*T, T) fp32, GQA by grouping
    [GRAPE-A]   scores = scores + alibi_bias(slopes)          -m_h (i - j), fp32, after the scaling
    scores    = scores.masked_fill(blocked, -inf)              blocked: j > i, or i - j >= W (local)
    probs     = softmax(scores).to(compute dtype)
    out       = probs @ v                                     (B, Hkv, G*T, D) -> (B, T, Hq*D)
    y         = out W_o
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.lower.builder import GraphBuilder
from compiler.ops.alibi import alibi_slopes
from compiler.ops.grape_m import grape_m_init_log_freq
from spec.errors import GrapefxError
from spec.schema import Attention, GrapeA, GrapeM, RoPE

ops = torch.ops.grapefx


def grape_m_theta(b: GraphBuilder, log_freq: fx.Node, scale: float) -> fx.Node:
    """theta_j = exp(p_j / c), fp32 (MATH.md §2)."""
    p = b("attn_log_freq_scaled", torch.div, log_freq, scale)
    return b("attn_theta", torch.exp, p)


def rope_theta(b: GraphBuilder, D: int, base: float, device: fx.Node) -> fx.Node:
    """Plain RoPE: theta_j = base^(-2j/D), j = 0..D/2-1, fp32 constants built in the graph."""
    two_j = b("attn_rope_2j", torch.arange, 0, D, 2, dtype=torch.float32, device=device)
    return b("attn_theta", torch.pow, base, b("attn_rope_exponent", torch.div, two_j, -float(D)))


def alibi_slopes_node(b: GraphBuilder, pos: GrapeA, Hq: int) -> fx.Node:
    """ALiBi slopes m_h over the query heads (MATH.md §3), fp32.

    Fixed (default): a buffer. Learnable: m_h = softplus(r_h) * alibi_h with r_h initialised at
    softplus^-1(1) = ln(e - 1), so training starts from the ALiBi slopes exactly.
    """
    base = b.param("attn.alibi.slopes", torch.tensor(alibi_slopes(Hq), dtype=torch.float32), trainable=False)
    if not pos.learnable:
        return base
    r = b.param("attn.alibi.slope_logit", torch.full((Hq,), math.log(math.e - 1.0)))
    return b("attn_alibi_slopes", torch.mul, b("attn_alibi_softplus", F.softplus, r), base)


def position_theta(b: GraphBuilder, attn: Attention, log_freq: fx.Node | None, device: fx.Node) -> fx.Node | None:
    """The rotation frequencies of a layer, (D/2,) fp32: GRAPE-M (MATH.md §2) or RoPE; None without rotation.

    A per-layer GRAPE-M vector (``share: layer``) is created here; the model-wide one comes in
    as ``log_freq``.
    """
    pos, D = attn.position, attn.head_dim
    if isinstance(pos, GrapeM):
        if pos.share == "layer":
            p0 = grape_m_init_log_freq(D, pos.base, pos.log_freq_scale)
            log_freq = b.param("attn.grape_m.log_freq", p0, trainable=pos.learnable_freq)
        elif log_freq is None:
            raise GrapefxError("internal: a model-wide GRAPE-M vector was not passed to the block")
        return grape_m_theta(b, log_freq, pos.log_freq_scale)
    if isinstance(pos, RoPE):
        return rope_theta(b, D, pos.base, device)
    return None


def attend(b: GraphBuilder, q: fx.Node, k: fx.Node, v: fx.Node, attn: Attention, *, Hkv: int, bsz: fx.Node,
           seqlen: fx.Node, rows: fx.Node, device: fx.Node, wo: fx.Node, cd: torch.dtype) -> fx.Node:
    """The chain after q, k, v (shared by GQA and TPA): scores -> [ALiBi] -> mask -> softmax -> values -> W_o.

    q (B, Hq, T, D) and k, v (B, Hkv, T, D), already normalised/rotated; ``rows`` is the node
    G*T with G = Hq / Hkv. Returns the projected output (B, T, C). The fusion passes match this
    chain node by node, so its structure is the same for every mechanism.
    """
    Hq, D = attn.heads, attn.head_dim
    G = Hq // Hkv
    pos = attn.position
    # scores, GQA by grouping: the G query heads of one KV head stacked along rows
    qg = b.method("attn_q_grouped", "reshape", q, bsz, Hkv, rows, D)            # (B, Hkv, G*T, D)
    kt = b.method("attn_k_t", "transpose", k, -2, -1)                                                    # (B, Hkv, D, T)
    s = b("attn_qk", torch.matmul, qg, kt)                                                                # (B, Hkv, G*T, T)
    s = s if cd == torch.float32 else b.method("attn_qk_fp32", "float", s)
    s = b("attn_scores", torch.mul, s, 1.0 / math.sqrt(D))                                               # fp32

    if isinstance(pos, GrapeA):
        slopes = alibi_slopes_node(b, pos, Hq)                                                           # (Hq,) fp32
        bias = b("attn_alibi_bias", ops.alibi_bias, slopes, seqlen, seqlen)                              # (Hq, T, T) fp32
        bias = b.method("attn_alibi_bias_grouped", "reshape", bias, Hkv, rows, seqlen)
        s = b("attn_scores_biased", torch.add, s, bias)

    # mask: query i may read key j iff 0 <= i - j <= W - 1 (local) / i - j >= 0 (global)
    idx = b("attn_pos", torch.arange, seqlen, device=device)
    rel = b("attn_rel", torch.sub, b.method("attn_pos_i", "unsqueeze", idx, 1), b.method("attn_pos_j", "unsqueeze", idx, 0))  # (T, T) i - j
    blocked = b("attn_future", torch.lt, rel, 0)
    if attn.window is not None:
        blocked = b("attn_blocked", torch.logical_or, blocked, b("attn_outside_window", torch.ge, rel, attn.window))
    blocked = b.method("attn_blocked_grouped", "repeat", blocked, G, 1)                                  # (G*T, T)
    s = b.method("attn_scores_masked", "masked_fill", s, blocked, float("-inf"))
    probs = b("attn_probs", torch.softmax, s, -1)                                                        # fp32
    probs = probs if cd == torch.float32 else b.method("attn_probs_c", "to", probs, cd)
    o = b("attn_weighted_values", torch.matmul, probs, v)                                                # (B, Hkv, G*T, D)
    o = b.method("attn_out_heads", "reshape", o, bsz, Hq, seqlen, D)                                     # (B, Hq, T, D)
    o = b.method("attn_out_tokens", "reshape", b.method("attn_out_t", "transpose", o, 1, 2), bsz, seqlen, Hq * D)  # (B, T, Hq*D)
    return b("attn_out", F.linear, o, wo)                                                               # (B, T, C)
