"""bias_softmax: a dense ALiBi (GRAPE-A) bias folded into a ``grapefx.attention`` node becomes
in-kernel slopes, so no T x T bias is materialised (MATH.md §3).

Produced by global layers with ``position: {kind: grape-a}`` (fixed slopes, or learnable:
slopes = softplus(r) * alibi, computed in the graph and kept there so r still gets gradients).
After ``attention_formation`` such a layer reads

    pattern                                                  replacement
    -------------------------------------------------        ---------------------------------------
    bias = alibi_bias(slopes, T, T)   (Hq, T, T), possibly   attention(q, k, v, theta, slopes,
           reshaped (Hkv, G*T, T) and back to (Hq, T, T)               window, scale)
    attention(q, k, v, theta, None, window, scale, bias)

(``biased_attention`` / ``slope_attention`` below, as eager math.) Both add -slopes[h] * (i - j)
in fp32 after the scaling, for query i and key j of the same sequence (q_len = k_len = T).

Prerequisite: ``attention_formation`` (it makes the ``grapefx.attention`` nodes with a dense bias).
Safety (``_unsafe``; declines quietly): the bias is exactly an ``alibi_bias(slopes, T, T)`` seen
through reshapes/views that end in its own (Hq, T, T) layout (so every element keeps its place),
q_len = k_len = the sequence length, slopes are a float (Hq,) vector, and the attention has no
slopes already. Layers without an additive position bias (GRAPE-M local layers, NoPE global
layers) have no candidate; the report says so.
"""

from __future__ import annotations

import torch
from torch import fx

from compiler.passes.match import (ATTENTION, PassResult, Reason, dtype, fold_into_attention, is_custom, is_op, shape,
                                   val)

NAME = "bias_softmax"
ALIBI = torch.ops.grapefx.alibi_bias


def biased_attention(q, k, v, theta, slopes, window: int, scale: float):
    """The pattern: the ALiBi bias as a dense (Hq, T, T) tensor."""
    T = q.shape[2]
    return ATTENTION(q, k, v, theta, None, window, scale, ALIBI(slopes, T, T))


def slope_attention(q, k, v, theta, slopes, window: int, scale: float):
    """The replacement: the slopes go into the kernel, which adds -slopes[h] * (i - j) per score."""
    return ATTENTION(q, k, v, theta, slopes, window, scale)


def _alibi_source(bias: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The ``alibi_bias`` node behind a chain of reshapes/views, and the chain; None if something else."""
    chain = []
    node = bias
    while is_op(node, "reshape") or is_op(node, "view"):
        chain.append(node)
        node = node.args[0]
    return (node, chain) if is_custom(node, ALIBI) else None


def _unsafe(attn: dict, alibi: fx.Node) -> Reason | None:
    q = val(attn["q"])
    B, Hq, T, D = q.shape
    if attn["slopes"] is not None:
        return Reason("has_slopes", "the attention already has in-kernel slopes")
    slopes, q_len, k_len = (alibi.args + (None, None))[:3]
    if val(q_len) != T or val(k_len) != T:
        return Reason("bias_lengths",
                      f"the ALiBi bias is for {val(q_len)} queries x {val(k_len)} keys, not the sequence's {T} x {T}")
    if shape(slopes) != (Hq,) or not dtype(slopes).is_floating_point:
        return Reason("slopes_shape",
                      f"the slopes are {shape(slopes)} {dtype(slopes)}, not a float vector of the {Hq} query heads")
    if shape(alibi) != (Hq, T, T) or shape(attn["bias"]) != (Hq, T, T):
        return Reason("bias_layout", "the bias reaches the attention in another layout than ALiBi's (Hq, T, T)")
    return None


def _fold(node: fx.Node, args: dict) -> dict | Reason:
    if args["bias"] is None:
        return Reason("no_dense_bias", "the attention has no dense bias (no additive position bias in this layer)")
    found = _alibi_source(args["bias"])
    if found is None:
        return Reason("bias_not_alibi", "the dense bias is not an alibi_bias (possibly reshaped)")
    alibi, _ = found
    reason = _unsafe(args, alibi)
    if reason is not None:
        return reason
    return {**args, "slopes": alibi.args[0], "bias": None}


def bias_softmax_pass(gm: fx.GraphModule) -> PassResult:
    """Turn every ALiBi bias of a ``grapefx.attention`` node of ``gm`` into in-kernel slopes, in place."""
    return fold_into_attention(gm, NAME, _fold)
