"""rotary_attention: the GRAPE-M (or RoPE) rotations of q and k that feed a ``grapefx.attention``
node fold into the op as in-kernel rotation (MATH.md §2).

Produced by local layers with ``position: {kind: grape-m}`` (theta = exp(p / c) from the
learnable or fixed ``log_freq`` p) or ``{kind: rope}`` (theta = base^(-2j/D)). After
``attention_formation`` such a layer reads

    pattern                                           replacement
    ----------------------------------------------    -------------------------------------------
    attention(grape_m_rotate(q, theta, 0),            attention(q, k, v, theta, slopes,
              grape_m_rotate(k, theta, 0),                      window, scale, bias)
              v, None, slopes, window, scale, bias)

(``rotated_attention`` / ``in_kernel_rotation_attention`` below, as eager math.) The op rotates q
and k at positions 0..T-1 exactly as ``grape_m_rotate`` does (fp32 angles, rounded to q's dtype).
The theta computation (exp(p / c)) stays in the graph and feeds the op, so when the frequencies
are learnable the op's dtheta flows back to ``log_freq``.

Prerequisite: ``attention_formation``. Safety (``_unsafe``; declines quietly): q and k are both
rotated, by the SAME theta node, at pos_offset 0; theta is a float (D/2,) vector; the rotated q
and k feed only this attention; the attention does not rotate already.
"""

from __future__ import annotations

import torch
from torch import fx

from compiler.passes.match import ATTENTION, PassResult, Reason, arg, dtype, fold_into_attention, is_custom, shape, val

NAME = "rotary_attention"
ROTATE = torch.ops.grapefx.grape_m_rotate


def rotated_attention(q, k, v, theta, slopes, window: int, scale: float):
    """The pattern: rotate q and k (B, H, T, D) at positions 0..T-1, then attend."""
    return ATTENTION(ROTATE(q, theta, 0), ROTATE(k, theta, 0), v, None, slopes, window, scale)


def in_kernel_rotation_attention(q, k, v, theta, slopes, window: int, scale: float):
    """The replacement: the kernel rotates the q and k tiles it loads."""
    return ATTENTION(q, k, v, theta, slopes, window, scale)


def _unsafe(attn_node: fx.Node, attn: dict) -> Reason | None:
    rq, rk = attn["q"], attn["k"]
    if attn["theta"] is not None:
        return Reason("has_theta", "the attention already rotates in-kernel")
    if not (is_custom(rq, ROTATE) and is_custom(rk, ROTATE)):
        return Reason("qk_not_rotated_outputs", "q and k are not both grape_m_rotate outputs")
    theta = arg(rq, 1, "theta")
    if arg(rk, 1, "theta") is not theta:
        return Reason("theta_differs", "q and k are rotated by different theta")
    if arg(rq, 2, "pos_offset", 0) != 0 or arg(rk, 2, "pos_offset", 0) != 0:
        return Reason("pos_offset", "a rotation starts at a position offset other than 0")
    D = shape(attn["q"])[-1]
    if shape(theta) != (D // 2,) or not dtype(theta).is_floating_point:
        return Reason("theta_shape", f"theta is {shape(theta)} {dtype(theta)}, not a float (D/2,) = ({D // 2},) vector")
    if set(rq.users) != {attn_node} or set(rk.users) != {attn_node}:
        return Reason("rotated_escapes", "the rotated q or k is also used outside this attention")
    if val(arg(rq, 0, "x")).dtype != val(rq).dtype:
        return Reason("rotation_dtype", "the rotation changes the dtype")
    return None


def _fold(node: fx.Node, args: dict) -> dict | Reason:
    if not (is_custom(args["q"], ROTATE) or is_custom(args["k"], ROTATE)):
        return Reason("not_rotated", "q and k are not rotated (no GRAPE-M/RoPE in this layer)")
    reason = _unsafe(node, args)
    if reason is not None:
        return reason
    rq, rk = args["q"], args["k"]
    return {**args, "q": arg(rq, 0, "x"), "k": arg(rk, 0, "x"), "theta": arg(rq, 1, "theta")}


def rotary_attention_pass(gm: fx.GraphModule) -> PassResult:
    """Fold the q/k rotations feeding every ``grapefx.attention`` node of ``gm`` into it, in place."""
    return fold_into_attention(gm, NAME, _fold)
