"""The words a position kind builds its signal from, in a block graph (``spec.schema.PositionKind``).

A kind's ``theta(g)`` / ``slopes(g)`` gets a ``PositionGraph`` and returns a node:

    g.rope(base)          theta_j = base^(-2j/D), j = 0..D/2-1        fp32 constants in the graph
    g.grape_m(pos)        theta_j = exp(p_j / c)                      p: the model-wide input or a layer parameter
    g.scale(theta, f)     theta * f                                   e.g. position interpolation, f = 1/s
    g.alibi(learnable)    m_h = alibi_h [* softplus(r_h)]             (Hq,) fp32

Theta is (D/2,) fp32 and feeds ``grape_m_rotate`` of q and k (MATH.md §2); slopes are (Hq,)
fp32 and feed the bias ``-m_h (i - j)`` after the scaling (MATH.md §3). A kind whose signal is
none of these adds a word here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from compiler.lower.builder import GraphBuilder
from compiler.ops.alibi import alibi_slopes
from compiler.ops.grape_m import grape_m_init_log_freq
from spec.errors import GrapefxError
from spec.schema import Attention, GrapeM

__all__ = ["PositionGraph", "position_theta", "position_slopes"]


class PositionGraph:
    """One layer's view for its position kind: the builder, D, Hq, the device node, the model-wide vector."""

    def __init__(self, b: GraphBuilder, attn: Attention, device: fx.Node, log_freq: fx.Node | None):
        self.b, self.D, self.Hq, self.device, self.log_freq = b, attn.head_dim, attn.heads, device, log_freq

    def rope(self, base: float) -> fx.Node:
        """Plain RoPE: theta_j = base^(-2j/D), j = 0..D/2-1, fp32 constants built in the graph."""
        b, D = self.b, self.D
        two_j = b("attn_rope_2j", torch.arange, 0, D, 2, dtype=torch.float32, device=self.device)
        return b("attn_theta", torch.pow, base, b("attn_rope_exponent", torch.div, two_j, -float(D)))

    def grape_m(self, pos: GrapeM) -> fx.Node:
        """theta_j = exp(p_j / c), fp32 (MATH.md §2). ``share: layer`` makes p a parameter of this
        layer (``attn.grape_m.log_freq``); ``share: model`` reads the block input ``grape_m_log_freq``."""
        b, log_freq = self.b, self.log_freq
        if not pos.model_wide:
            p0 = grape_m_init_log_freq(self.D, pos.base, pos.log_freq_scale)
            log_freq = b.param("attn.grape_m.log_freq", p0, trainable=pos.learnable_freq)
        elif log_freq is None:
            raise GrapefxError("internal: a model-wide GRAPE-M vector was not passed to the block")
        p = b("attn_log_freq_scaled", torch.div, log_freq, pos.log_freq_scale)
        return b("attn_theta", torch.exp, p)

    def scale(self, theta: fx.Node, factor: float) -> fx.Node:
        """theta * factor (every frequency scaled alike)."""
        return self.b("attn_theta_scaled", torch.mul, theta, float(factor))

    def alibi(self, learnable: bool) -> fx.Node:
        """ALiBi slopes m_h over the query heads (MATH.md §3), fp32.

        Fixed: a buffer. Learnable: m_h = softplus(r_h) * alibi_h with r_h initialised at
        softplus^-1(1) = ln(e - 1), so training starts from the ALiBi slopes exactly.
        """
        b, Hq = self.b, self.Hq
        base = b.param("attn.alibi.slopes", torch.tensor(alibi_slopes(Hq), dtype=torch.float32), trainable=False)
        if not learnable:
            return base
        r = b.param("attn.alibi.slope_logit", torch.full((Hq,), math.log(math.e - 1.0)))
        return b("attn_alibi_slopes", torch.mul, b("attn_alibi_softplus", F.softplus, r), base)


def position_theta(b: GraphBuilder, attn: Attention, log_freq: fx.Node | None, device: fx.Node) -> fx.Node | None:
    """The rotation frequencies of a layer, (D/2,) fp32, from its position kind; None when it does not rotate."""
    pos = attn.position
    return pos.theta(PositionGraph(b, attn, device, log_freq)) if pos.rotates else None


def position_slopes(b: GraphBuilder, attn: Attention, device: fx.Node) -> fx.Node | None:
    """The per-head bias slopes of a layer, (Hq,) fp32, from its position kind; None without a bias."""
    pos = attn.position
    return pos.slopes(PositionGraph(b, attn, device, None)) if pos.adds_bias else None
