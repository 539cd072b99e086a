"""The attention chain after q, k, v, shared by every mechanism (GQA ``attention.py``, TPA ``tpa.py``).

The chain from ``scores`` on, as written out in ``compiler/lower/attention.py``'s docstring:
scores (fp32, scaled) -> [GRAPE-A bias] -> window mask -> softmax -> probs @ v -> W_o.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.lower.builder import GraphBuilder, tag
from compiler.lower.position import position_slopes
from compiler.window import blocked as window_blocked
from spec.schema import Attention

ops = torch.ops.grapefx


def attend(b: GraphBuilder, q: fx.Node, k: fx.Node, v: fx.Node, attn: Attention, *, Hkv: int, bsz: fx.Node,
           seqlen: fx.Node, rows: fx.Node, device: fx.Node, wo: fx.Node, cd: torch.dtype) -> fx.Node:
    """The chain after q, k, v (shared by GQA and TPA): scores -> [ALiBi] -> mask -> softmax -> values -> W_o.

    q (B, Hq, T, D) and k, v (B, Hkv, T, D), already normalised/rotated; ``rows`` is the node
    G*T with G = Hq / Hkv. Returns the projected output (B, T, C). The fusion passes match this
    chain node by node, so its structure is the same for every mechanism.
    """
    Hq, D = attn.heads, attn.head_dim
    G = Hq // Hkv
    tag(q, "attention.q"), tag(k, "attention.k"), tag(v, "attention.v")
    # scores, GQA by grouping: the G query heads of one KV head stacked along rows
    qg = b.method("attn_q_grouped", "reshape", q, bsz, Hkv, rows, D)            # (B, Hkv, G*T, D)
    kt = b.method("attn_k_t", "transpose", k, -2, -1)                                                    # (B, Hkv, D, T)
    s = b("attn_qk", torch.matmul, qg, kt)                                                                # (B, Hkv, G*T, T)
    s = s if cd == torch.float32 else b.method("attn_qk_fp32", "float", s)
    s = tag(b("attn_scores", torch.mul, s, 1.0 / math.sqrt(D)), "attention.scores")                     # fp32

    slopes = position_slopes(b, attn, device)                                                            # (Hq,) fp32 or None
    if slopes is not None:
        tag(slopes, "attention.slopes")
        bias = b("attn_alibi_bias", ops.alibi_bias, slopes, seqlen, seqlen)                              # (Hq, T, T) fp32
        bias = b.method("attn_alibi_bias_grouped", "reshape", bias, Hkv, rows, seqlen)
        s = b("attn_scores_biased", torch.add, s, bias)

    # mask: query i may read key j iff 0 <= i - j <= W - 1 (local) / i - j >= 0 (global)
    idx = b("attn_pos", torch.arange, seqlen, device=device)
    rel = b("attn_rel", torch.sub, b.method("attn_pos_i", "unsqueeze", idx, 1), b.method("attn_pos_j", "unsqueeze", idx, 0))  # (T, T) i - j
    blocked = window_blocked(rel, attn.window, call=b)                                                   # (T, T)
    blocked = b.method("attn_blocked_grouped", "repeat", blocked, G, 1)                                  # (G*T, T)
    s = b.method("attn_scores_masked", "masked_fill", s, blocked, float("-inf"))
    probs = b("attn_probs", torch.softmax, s, -1)                                                        # fp32
    probs = probs if cd == torch.float32 else b.method("attn_probs_c", "to", probs, cd)
    o = b("attn_weighted_values", torch.matmul, probs, v)                                                # (B, Hkv, G*T, D)
    o = b.method("attn_out_heads", "reshape", o, bsz, Hq, seqlen, D)                                     # (B, Hq, T, D)
    o = b.method("attn_out_tokens", "reshape", b.method("attn_out_t", "transpose", o, 1, 2), bsz, seqlen, Hq * D)  # (B, T, Hq*D)
    tag(o, "attention.out")
    return b("attn_out", F.linear, o, wo)                                                               # (B, T, C)
