"""Tensor Product Attention (TPA) sub-graphs: q, k, v from per-token factors (MATH.md §4).

Source: Zhang et al., "Tensor Product Attention Is All You Need", arXiv:2501.06425 (code:
tensorgi/T6, ``model/T6.py``). Per token t, with R_Q, R_K, R_V ranks, Hq query heads, D head dim:

    A_Q = x W_aq  (R_Q, Hq)    B_Q = x W_bq  (R_Q, D)     Q_t = (1/R_Q) A_Q^T B_Q   (Hq, D)
    A_K = x W_ak  (R_K, n)     B_K = x W_bk  (R_K, D)     K_t = (1/R_K) A_K^T B_K   (n, D)
    A_V = x W_av  (R_V, n)     B_V = x W_bv  (R_V, D)     V_t = (1/R_V) A_V^T B_V   (n, D)

Head factors (``head_factors``):
- ``heads`` (the paper): A_K, A_V span all n = Hq heads, so K and V have one head per query head
  and the attention chain runs with G = 1 (``kv_heads`` plays no part).
- ``kv_groups`` (the vpMoE Megatron fork): A_K, A_V span the n = Hkv KV groups, so K and V have Hkv
  heads and query head h reads K/V head h // G, G = Hq / Hkv, exactly as GQA.

Position: GRAPE-M (or RoPE) rotates the rows of B_Q and B_K **before** the contraction. This is
exact: the rotation acts on D only, with angles that depend on the position alone (theta is
shared by every head, MATH.md §2), so R(t) applied to every head of (1/R) A^T B equals
(1/R) A^T (B R(t)). V is never rotated. The pass ``tpa_rotation_commute`` moves the rotation
after the contraction again, where ``rotary_attention`` folds it into the fused kernel; the
KV cache keeps the pre-rotated B_K (``runtime/generate.py``).

Graph layout: every factor is (B, R, T, width), so ``grape_m_rotate`` (which turns dim -1 at the
positions of dim -2) applies to B unchanged, and the contraction is one einsum,
``TPA_CONTRACTION`` = "brth,brtd->bhtd", whose output (B, heads, T, D) feeds the chain of
``attend.attend`` at ``attn_q`` / ``attn_k`` / ``attn_v``. The 1/R is folded into A
(``attn_aq_scaled``), the smaller factor.

State dict (0-based layer i), each a ``nn.Linear``-style (out, in) matrix whose rows are rank-major
(row r * width + j is factor r, coordinate j):

    layers.{i}.attn.wa_q (R_Q*Hq, C)   wb_q (R_Q*D, C)
    layers.{i}.attn.wa_k (R_K*n, C)    wb_k (R_K*D, C)
    layers.{i}.attn.wa_v (R_V*n, C)    wb_v (R_V*D, C)
    layers.{i}.attn.wo   (C, Hq*D)

Parameters per layer: C (R_Q (Hq + D) + (R_K + R_V)(n + D)) + Hq D C, as ``spec.derive`` counts.

Initialisation (our choice): every factor weight draws from the project's per-name normal init
with ``model.init.std``, and W_o uses the scaled output std like every residual output
projection. T6 instead uses Xavier-uniform factors and a zero W_o; keeping GQA's init makes a
TPA-vs-GQA ablation differ in the mechanism only, and at C = 1024, std 0.02 it starts q with
entries of std ~ std^2 C / sqrt(R_Q) = 0.17 (T6's init: about 0.04), so attention is not stuck at
uniform.

Not supported: QK-norm. A per-coordinate RMSNorm weight on the contracted q/k does not commute
with the rotation, so B could no longer be pre-rotated (and the cache could not hold factors);
``spec.validate`` rejects the combination.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.lower.attend import attend
from compiler.lower.builder import GraphBuilder
from compiler.lower.common import weight
from compiler.lower.init import Initializer
from compiler.lower.position import position_theta
from spec.errors import GrapefxError
from spec.schema import Attention

__all__ = ["lower_tpa", "TPA_CONTRACTION", "tpa_heads"]

ops = torch.ops.grapefx

# (B, R, T, heads) x (B, R, T, D) -> (B, heads, T, D): sum over the rank r, per token t
TPA_CONTRACTION = "brth,brtd->bhtd"


def tpa_heads(attn: Attention) -> int:
    """n, the heads of K and V: Hq with ``head_factors: heads``, Hkv with ``kv_groups``."""
    return attn.heads if attn.tpa_ranks()[0] == "heads" else attn.kv_heads


def _factor(b: GraphBuilder, x: fx.Node, tag: str, w: fx.Node, bsz: fx.Node, seqlen: fx.Node, rank: int,
            width: int) -> fx.Node:
    """x W^T viewed as ``rank`` factors of ``width`` per token: (B, R, T, width)."""
    p = b(f"attn_{tag}_proj", F.linear, x, w)                                        # (B, T, R*width)
    f = b.method(f"attn_{tag}_factors", "view", p, bsz, seqlen, rank, width)         # (B, T, R, width)
    return b.method(f"attn_{tag}", "transpose", f, 1, 2)                             # (B, R, T, width)


def lower_tpa(b: GraphBuilder, x: fx.Node, attn: Attention, *, C: int, eps: float, qk_norm: bool,
              log_freq: fx.Node | None, name: str, init: Initializer, cd: torch.dtype) -> fx.Node:
    """Append one TPA sub-layer to ``b`` (arguments as ``attention.lower_attention``); returns (B, T, C)."""
    if qk_norm:
        raise GrapefxError("model.qk_norm: QK-norm is not supported with attention mechanism tpa (MATH.md §4: "
                           "the rotation is applied to the B factors before the contraction, and a normalisation "
                           "of the contracted q, k would have to come first); set qk_norm: false or use gqa")
    Hq, D = attn.heads, attn.head_dim
    _, r_q, r_k, r_v = attn.tpa_ranks()
    n = tpa_heads(attn)
    G = Hq // n

    bsz = b.method("attn_bsz", "size", x, 0)
    seqlen = b.method("attn_seqlen", "size", x, 1)
    rows = b("attn_group_rows", operator.mul, seqlen, G)                             # G*T
    device = b("attn_device", getattr, x, "device")

    def w(key: str, shape: tuple[int, int], output: bool = False) -> fx.Node:
        return weight(b, f"attn.{key}", init.normal(f"{name}.attn.{key}", shape, output=output), cd)

    wa_q, wb_q = w("wa_q", (r_q * Hq, C)), w("wb_q", (r_q * D, C))
    wa_k, wb_k = w("wa_k", (r_k * n, C)), w("wb_k", (r_k * D, C))
    wa_v, wb_v = w("wa_v", (r_v * n, C)), w("wb_v", (r_v * D, C))
    wo = w("wo", (C, Hq * D), output=True)

    aq = _factor(b, x, "aq", wa_q, bsz, seqlen, r_q, Hq)                             # (B, R_Q, T, Hq)
    bq = _factor(b, x, "bq", wb_q, bsz, seqlen, r_q, D)                              # (B, R_Q, T, D)
    ak = _factor(b, x, "ak", wa_k, bsz, seqlen, r_k, n)                              # (B, R_K, T, n)
    bk = _factor(b, x, "bk", wb_k, bsz, seqlen, r_k, D)                              # (B, R_K, T, D)
    av = _factor(b, x, "av", wa_v, bsz, seqlen, r_v, n)                              # (B, R_V, T, n)
    bv = _factor(b, x, "bv", wb_v, bsz, seqlen, r_v, D)                              # (B, R_V, T, D)
    aq = b("attn_aq_scaled", torch.mul, aq, 1.0 / r_q)                               # the 1/R of Q_t, folded into A
    ak = b("attn_ak_scaled", torch.mul, ak, 1.0 / r_k)
    av = b("attn_av_scaled", torch.mul, av, 1.0 / r_v)

    theta = position_theta(b, attn, log_freq, device)                                # (D/2,) fp32 or None
    if theta is not None:
        bq = b("attn_rotate_bq", ops.grape_m_rotate, bq, theta)                      # rows of B_Q turned at t
        bk = b("attn_rotate_bk", ops.grape_m_rotate, bk, theta)

    q = b("attn_q", torch.einsum, TPA_CONTRACTION, aq, bq)                           # (B, Hq, T, D)
    k = b("attn_k", torch.einsum, TPA_CONTRACTION, ak, bk)                           # (B, n, T, D)
    v = b("attn_v", torch.einsum, TPA_CONTRACTION, av, bv)                           # (B, n, T, D)
    return attend(b, q, k, v, attn, Hkv=n, bsz=bsz, seqlen=seqlen, rows=rows, device=device, wo=wo, cd=cd)
