"""GQA attention sub-graphs as explicit reference math (MATH.md §1–§3).

The chain every attention layer lowers to (the fusion passes match this structure):

    q, k, v   = x W_q, x W_k, x W_v                          (B, H, T, D) per head
    [qk-norm]   RMSNorm over D, before any rotation           (MATH.md §2)
    [GRAPE-M]   q, k = grape_m_rotate(q, theta), grape_m_rotate(k, theta); theta = exp(p / c)
    scores    = (q_g @ k^T).float() * 1/sqrt(D)               (B, Hkv, G*T, T) fp32, GQA by grouping
    [GRAPE-A]   scores = scores + alibi_bias(slopes)          -m_h (i - j), fp32, after the scaling
    scores    = scores.masked_fill(blocked, -inf)              blocked: j > i, or i - j >= W (local)
    probs     = softmax(scores).to(compute dtype)
    out       = probs @ v                                     (B, Hkv, G*T, D) -> (B, T, Hq*D)
    y         = out W_o

The chain from ``scores`` on is ``attend`` (``compiler/lower/attend.py``), shared with TPA
(``compiler/lower/tpa.py``), which builds q, k, v from per-token factors instead of W_q, W_k, W_v.

Node names are for reading: the passes match by structure, and the KV-cache decoder
(``runtime/generate.py``) cuts the graphs at nodes tagged with a role (``attention.q``, ``.k``,
``.v``, ``.scores``, ``.slopes``, ``.out``, ``moe.expert_index``, ``head.logits``;
``compiler/lower/builder.py`` lists them).

GQA: the G = Hq / Hkv query heads that read one KV head are stacked along the row axis of q
((B, Hkv, G*T, D)), so one matmul per KV head computes their scores and K/V are never repeated.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.lower.attend import attend
from compiler.lower.builder import GraphBuilder
from compiler.lower.common import rmsnorm, weight
from compiler.lower.init import Initializer
from compiler.lower.position import position_theta
from compiler.lower.tpa import lower_tpa
from spec.errors import GrapefxError
from spec.schema import Attention

ops = torch.ops.grapefx


def lower_attention(b: GraphBuilder, x: fx.Node, attn: Attention, *, C: int, eps: float, qk_norm: bool,
                    log_freq: fx.Node | None, name: str, init: Initializer, cd: torch.dtype) -> fx.Node:
    """Append one attention sub-layer's math to ``b``; returns the projected output (B, T, C).

    ``x`` is the normalised input (B, T, C). ``log_freq`` is the model-wide GRAPE-M vector when
    the spec shares it (``share: model``); per-layer vectors are created here. ``name`` is the
    block's state-dict prefix (``layers.3``) for per-name seeded initialisation.
    """
    if attn.mechanism == "tpa":
        return lower_tpa(b, x, attn, C=C, eps=eps, qk_norm=qk_norm, log_freq=log_freq, name=name, init=init, cd=cd)
    if attn.mechanism != "gqa":
        raise GrapefxError(f"attention mechanism {attn.mechanism!r} has no lowering yet; use `gqa` or `tpa`")
    Hq, Hkv, D = attn.heads, attn.kv_heads, attn.head_dim
    G = Hq // Hkv

    bsz = b.method("attn_bsz", "size", x, 0)
    seqlen = b.method("attn_seqlen", "size", x, 1)
    rows = b("attn_group_rows", operator.mul, seqlen, G)                         # G*T
    device = b("attn_device", getattr, x, "device")

    wq = weight(b, "attn.wq", init.normal(f"{name}.attn.wq", (Hq * D, C)), cd)
    wk = weight(b, "attn.wk", init.normal(f"{name}.attn.wk", (Hkv * D, C)), cd)
    wv = weight(b, "attn.wv", init.normal(f"{name}.attn.wv", (Hkv * D, C)), cd)
    wo = weight(b, "attn.wo", init.normal(f"{name}.attn.wo", (C, Hq * D), output=True), cd)

    q = b("attn_q_proj", F.linear, x, wq)                                        # (B, T, Hq*D)
    k = b("attn_k_proj", F.linear, x, wk)                                        # (B, T, Hkv*D)
    v = b("attn_v_proj", F.linear, x, wv)                                        # (B, T, Hkv*D)
    q = b.method("attn_q", "transpose", b.method("attn_q_heads", "view", q, bsz, seqlen, Hq, D), 1, 2)   # (B, Hq, T, D)
    k = b.method("attn_k", "transpose", b.method("attn_k_heads", "view", k, bsz, seqlen, Hkv, D), 1, 2)  # (B, Hkv, T, D)
    v = b.method("attn_v", "transpose", b.method("attn_v_heads", "view", v, bsz, seqlen, Hkv, D), 1, 2)  # (B, Hkv, T, D)

    if qk_norm:
        qn = b.param("attn.q_norm.weight", Initializer.ones((D,)))
        kn = b.param("attn.k_norm.weight", Initializer.ones((D,)))
        q = rmsnorm(b, "attn_q_norm", q, qn, D, eps, cd)
        k = rmsnorm(b, "attn_k_norm", k, kn, D, eps, cd)

    theta = position_theta(b, attn, log_freq, device)                            # (D/2,) fp32 or None
    if theta is not None:
        q = b("attn_rotate_q", ops.grape_m_rotate, q, theta)                     # (B, Hq, T, D)
        k = b("attn_rotate_k", ops.grape_m_rotate, k, theta)                     # (B, Hkv, T, D)
    return attend(b, q, k, v, attn, Hkv=Hkv, bsz=bsz, seqlen=seqlen, rows=rows, device=device, wo=wo, cd=cd)
