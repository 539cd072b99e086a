"""attention_formation: the explicit scores -> mask -> softmax -> values chain becomes one
``grapefx.attention`` node (MATH.md §1–§3).

Every attention layer lowers to this chain (``compiler/lower/attend.py``), whatever its spec:
local or global, GQA group size, window, position encoding. The pass is the prerequisite of the
other two: ``bias_softmax`` and ``rotary_attention`` rewrite the ``grapefx.attention`` node it makes.

    pattern (what the lowering writes)             replacement (what runs instead)
    ------------------------------------           ------------------------------------------------
    see ``explicit_attention``                     see ``fused_attention``

- window: read from the mask subgraph, which must be exactly the lowering's causal/window mask
  (``blocked_mask``): blocked = (i - j < 0) [or (i - j >= W)], i, j = arange(T), repeated G times
  along the rows. Any other mask is declined.
- scale: the constant the raw scores are multiplied by (or divided by: scale = 1 / c).
- GQA: from the shapes, q (B, Hq, T, D) grouped as (B, Hkv, G*T, D); G = Hq / Hkv.
- an additive bias (the GRAPE-A/ALiBi bias of global layers, or any other) folds into the op's
  dense ``bias`` argument as (Hq, T, T); ``bias_softmax`` turns an ALiBi bias into in-kernel slopes.

Safety (``_unsafe``; declines quietly): q, k, v share a float dtype and (B, H, T, D) shapes; the
scores are in the op's compute dtype (fp32; fp64 for fp64 inputs), so the softmax precision does
not change; the probabilities are cast back to q's dtype before the values matmul; the bias is
float and does not depend on the batch; the scale is a constant; no intermediate of the chain
(grouped q, scores, probabilities, ...) is used anywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from compiler.passes.match import (ATTENTION, PassResult, Reason, arg, count, dtype, finish, infer_meta, is_op,
                                   layer_prefix, only_user, shape, shape_args, val)
from compiler.window import blocked as window_blocked

NAME = "attention_formation"


# ----------------------------------------------------------------------------- the math, side by side
def blocked_mask(T: int, window: int, G: int, device: torch.device | None = None) -> torch.Tensor:
    """(G*T, T) bool: query i may not read key j (j > i, or i - j >= window when window > 0)."""
    idx = torch.arange(T, device=device)
    rel = idx.unsqueeze(1) - idx.unsqueeze(0)                                   # (T, T) i - j
    return window_blocked(rel, window).repeat(G, 1)                             # (G*T, T)


def explicit_attention(q, k, v, bias, window: int, scale: float):
    """The pattern. q (B, Hq, T, D), k/v (B, Hkv, T, D), bias broadcastable to (B, Hkv, G*T, T) or None."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    qg = q.reshape(B, k.shape[1], G * T, D)                                     # (B, Hkv, G*T, D)
    s = torch.matmul(qg, k.transpose(-2, -1)).float() * scale                   # (B, Hkv, G*T, T) fp32
    if bias is not None:
        s = s + bias
    s = s.masked_fill(blocked_mask(T, window, G, q.device), float("-inf"))
    p = torch.softmax(s, -1).to(q.dtype)
    return torch.matmul(p, v).reshape(B, Hq, T, D)                              # (B, Hq, T, D)


def fused_attention(q, k, v, bias, window: int, scale: float):
    """The replacement: one op; a bias is handed over per query head, (Hq, T, T)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    heads = None if bias is None else bias.expand(Hkv, Hq // Hkv * T, T).reshape(Hq, T, T)
    return ATTENTION(q, k, v, None, None, window, scale, heads)


# ----------------------------------------------------------------------------- matching
@dataclass
class _Chain:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    bias: Any            # fx.Node or None
    scale: Any           # a number (checked by _unsafe)
    window: int
    out: fx.Node         # the (B, Hq, T, D) reshape the fused op replaces
    rows_arg: Any        # G*T as the graph spells it (int or node), from the grouping reshape
    t_arg: Any           # T as the graph spells it, from the output reshape
    scores: fx.Node      # the fp32 scores the softmax reads (before bias)
    pv: fx.Node          # probabilities @ v (B, Hkv, G*T, D)
    mask: fx.Node
    intermediates: list  # (node, its one allowed user), each must not escape


def _float_cast(node: Any) -> bool:
    return is_op(node, "float") or (is_op(node, "to") and arg(node, 1, "dtype") is torch.float32)


def _scaled_scores(node: Any) -> tuple | None:
    """node = [float](matmul(qg, kt)) * c (or / c) -> (qg, kt, scale, [intermediates]); None otherwise."""
    if is_op(node, "mul") and "alpha" not in node.kwargs:
        a, b = node.args[:2]
        x, c = (a, b) if isinstance(a, fx.Node) else (b, a)
        scale = c
    elif is_op(node, "div") and "rounding_mode" not in node.kwargs:
        x, c = node.args[:2]
        scale = 1.0 / c if isinstance(c, (int, float)) and c else c
    else:
        return None
    steps = [(x, node)]
    if _float_cast(x):
        steps.append((x.args[0], x))
        x = x.args[0]
    if not is_op(x, "matmul"):
        return None
    qg, kt = x.args[:2]
    return qg, kt, scale, steps + [(qg, x), (kt, x)]


def _from_zero(args: tuple) -> bool:
    """arange(n), arange(0, n) or arange(0, n, 1)."""
    return len(args) == 1 or (len(args) in (2, 3) and args[0] == 0 and args[2:] in ((), (1,)))


def _window(mask: fx.Node, G: int, T: int) -> int | Reason:
    """The window of the lowering's mask (0: causal only), or why ``mask`` is not that mask."""
    m = mask
    if is_op(m, "repeat"):
        reps = tuple(shape_args(m))
        if reps != (G, 1):
            return Reason("mask_repeat", f"the mask is repeated {reps} along (rows, keys), not ({G}, 1) for G = {G}")
        m = m.args[0]
    elif G != 1:
        return Reason("mask_not_repeated", "the mask is not repeated over the G query heads of a KV head")
    parts = list(m.args[:2]) if is_op(m, "logical_or") else [m]
    rels, window, causal = set(), 0, False
    for p in parts:
        if not (isinstance(p, fx.Node) and len(p.args) == 2 and type(p.args[1]) is int):
            return Reason("mask_not_comparisons", "the mask is not built from comparisons of i - j with integers")
        rel, c = p.args
        if is_op(p, "lt") and c == 0:
            causal = True
        elif is_op(p, "ge") and c >= 1:
            window = c
        elif is_op(p, "gt") and c >= 0:
            window = c + 1
        else:
            return Reason("mask_comparison",
                          "the mask compares i - j in a way that is not causal (i - j < 0) or a window (i - j >= W)")
        rels.add(rel)
    if not causal or len(rels) != 1 or len(parts) != (2 if window else 1):
        return Reason("mask_not_causal", "the mask is not exactly causal [or causal + window]")
    rel = rels.pop()
    if not (is_op(rel, "sub") and all(is_op(u, "unsqueeze") for u in rel.args[:2])):
        return Reason("mask_rel", "the mask's i - j is not arange(T).unsqueeze(1) - arange(T).unsqueeze(0)")
    (ia, da), (ja, dj) = ((u.args[0], arg(u, 1, "dim")) for u in rel.args[:2])
    if ia is not ja or da not in (1, -1) or dj not in (0, -2):
        return Reason("mask_rel", "the mask's i - j is not arange(T).unsqueeze(1) - arange(T).unsqueeze(0)")
    if not is_op(ia, "arange") or not _from_zero(ia.args) or set(ia.kwargs) - {"device", "dtype"}:
        return Reason("mask_positions", "the mask's positions are not arange(T)")
    if shape(ia) != (T,) or dtype(ia).is_floating_point:
        return Reason("mask_positions_shape", f"the mask's positions are not the {T} integer positions of the sequence")
    return window


def _match(probs: fx.Node) -> _Chain | Reason:
    """The chain ending in the softmax ``probs``, or why it is not the explicit attention chain."""
    masked = probs.args[0]
    if arg(probs, 1, "dim") not in (-1, 3) or probs.kwargs.get("dtype") is not None:
        return Reason("softmax_dim", "the softmax is not over the keys (last dim) in the scores' dtype")
    value = arg(masked, 2, "value")
    if not (isinstance(value, float) and math.isinf(value) and value < 0):
        return Reason("fill_not_neg_inf", "blocked scores are not filled with -inf")
    s, mask = masked.args[:2]
    bias, found = None, _scaled_scores(s)
    add = s
    if found is None and is_op(s, "add") and "alpha" not in s.kwargs:
        for x, other in ((s.args[0], s.args[1]), (s.args[1], s.args[0])):
            found = _scaled_scores(x)
            if found is not None and isinstance(other, fx.Node):
                s, bias = x, other
                break
            found = None
    if found is None:
        return Reason("scores_not_scaled_qk", "the masked scores are not (q @ k^T) * scale [+ bias]")
    qg, kt, scale, steps = found
    if not (is_op(qg, "reshape") or is_op(qg, "view")):
        return Reason("q_not_grouped", "q is not grouped by a reshape to (B, Hkv, G*T, D)")
    if not (is_op(kt, "transpose") and {d % 4 for d in kt.args[1:3]} == {2, 3}):
        return Reason("k_not_transposed", "k is not transposed over its last two dims")

    users = list(probs.users)
    if len(users) != 1:
        return Reason("probs_escape", "the probabilities are used elsewhere")
    p = probs
    if is_op(users[0], "to") and isinstance(arg(users[0], 1, "dtype"), torch.dtype):
        steps.append((p, users[0]))
        p = users[0]
        users = list(p.users)
    if len(users) != 1 or not is_op(users[0], "matmul") or users[0].args[0] is not p:
        return Reason("probs_not_one_matmul", "the probabilities do not feed exactly one matmul with v")
    pv = users[0]
    steps.append((p, pv))
    outs = list(pv.users)
    if len(outs) != 1 or not (is_op(outs[0], "reshape") or is_op(outs[0], "view")):
        return Reason("values_not_reshaped", "the weighted values are not reshaped back to (B, Hq, T, D)")
    out = outs[0]
    q, k, v = qg.args[0], kt.args[0], pv.args[1]
    if shape(q) is None or len(shape(q)) != 4 or shape(k) is None or len(shape(k)) != 4:
        return Reason("qk_no_shape", "q or k has no (B, H, T, D) shape")
    B, Hq, T, D = shape(q)
    Hkv = shape(k)[1]
    G = Hq // Hkv if Hkv and Hq % Hkv == 0 else 0
    window = _window(mask, G, T)
    if isinstance(window, str):
        return window
    dims_q, dims_out = shape_args(qg), shape_args(out)
    if len(dims_q) != 4 or len(dims_out) != 4:
        return Reason("reshape_sizes_unspelled", "the grouping or output reshape does not spell out four sizes")
    steps += [(s, add if bias is not None else masked), (add, masked), (masked, probs), (pv, out)]
    if bias is None:
        steps.remove((add, masked))
    return _Chain(q=q, k=k, v=v, bias=bias, scale=scale, window=window, out=out, rows_arg=dims_q[2],
                  t_arg=dims_out[2], scores=s, pv=pv, mask=mask, intermediates=steps)


def _unsafe(c: _Chain) -> Reason | None:
    """Why fusing ``c`` could change what the graph computes (None: safe)."""
    q, k, v = val(c.q), val(c.k), val(c.v)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return Reason("qkv_not_4d", "q, k, v are not (B, H, T, D) tensors")
    B, Hq, T, D = q.shape
    if k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D) or Hq % k.shape[1]:
        return Reason("qkv_not_gqa",
                      f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not GQA-compatible")
    Hkv, G = k.shape[1], Hq // k.shape[1]
    if not (q.dtype == k.dtype == v.dtype and q.dtype.is_floating_point):
        return Reason("qkv_dtypes", f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not isinstance(c.scale, (int, float)) or isinstance(c.scale, bool):
        return Reason("scale_not_constant", "the scale is not a constant")
    cd = torch.promote_types(q.dtype, torch.float32)
    if dtype(c.scores) != cd:
        return Reason("scores_dtype",
                      f"the scores are {dtype(c.scores)}, not {cd}: fusing would change the softmax precision")
    if shape(c.scores) != (B, Hkv, G * T, T):
        return Reason("scores_shape",
                      f"the scores are {shape(c.scores)}, not the grouped (B, Hkv, G*T, T) = {(B, Hkv, G * T, T)}")
    if dtype(c.pv) != q.dtype or shape(c.out) != (B, Hq, T, D):
        return Reason("output_shape", "the output is not (B, Hq, T, D) in q's dtype")
    if dtype(c.mask) != torch.bool:
        return Reason("mask_not_bool", "the mask is not boolean")
    if val(c.t_arg) != T or val(c.rows_arg) != G * T:
        return Reason("reshape_sizes", "the reshape sizes are not T and G*T")
    if c.bias is not None:
        b = val(c.bias)
        if not isinstance(b, torch.Tensor) or not b.dtype.is_floating_point or b.dim() > 4:
            return Reason("bias_not_float", "the additive bias is not a float tensor")
        full = (1,) * (4 - b.dim()) + tuple(b.shape)
        if full[0] != 1 or any(n not in (1, m) for n, m in zip(full[1:], (Hkv, G * T, T))):
            return Reason("bias_shape",
                          f"the additive bias {tuple(b.shape)} depends on the batch or does not broadcast to (Hkv, G*T, T)")
    for node, user in c.intermediates:
        if isinstance(node, fx.Node) and node.op not in ("placeholder", "get_attr") and node not in (c.q, c.k, c.v):
            if not only_user(node, user):
                return Reason("intermediate_escapes",
                              f"an intermediate of the chain ({node.op} {node.target}) is used elsewhere")
    return None


# ----------------------------------------------------------------------------- the pass
def _rewrite(gm: fx.GraphModule, c: _Chain, prefix: str) -> None:
    g = gm.graph
    Hq, Hkv = shape(c.q)[1], shape(c.k)[1]
    with g.inserting_before(c.out):
        heads = None
        if c.bias is not None:                           # (.., Hkv, G*T, T) -> (Hq, T, T) per query head
            b = c.bias
            if len(shape(b)) == 4:
                b = g.create_node("call_method", "squeeze", (b, 0), name=prefix + "attn_bias_squeezed")
                infer_meta(b)
            if shape(b) != (Hkv, val(c.rows_arg), val(c.t_arg)):
                b = g.create_node("call_method", "expand", (b, Hkv, c.rows_arg, c.t_arg), name=prefix + "attn_bias_full")
                infer_meta(b)
            heads = g.create_node("call_method", "reshape", (b, Hq, c.t_arg, c.t_arg), name=prefix + "attn_bias_heads")
            infer_meta(heads)
        args = (c.q, c.k, c.v, None, None, c.window, float(c.scale)) + ((heads,) if heads is not None else ())
        fused = g.create_node("call_function", ATTENTION, args, name=prefix + "attn_fused")
        infer_meta(fused)
    fused.meta["grapefx_fused"] = [NAME]
    c.out.replace_all_uses_with(fused)


def attention_formation_pass(gm: fx.GraphModule) -> PassResult:
    """Fuse every explicit attention chain of ``gm`` (a block graph with ``meta["val"]``) in place."""
    result = PassResult(NAME)
    before = list(gm.graph.nodes)
    candidates = [n for n in before if is_op(n, "softmax") and is_op(n.args[0], "masked_fill")]
    if not candidates:
        result.absent = Reason("absent", "no softmax over masked scores (no explicit attention chain)")
    prefix = layer_prefix(gm)
    for probs in candidates:
        chain = _match(probs)
        reason = chain if isinstance(chain, str) else _unsafe(chain)
        if reason is not None:
            result.declined.append(reason)
            continue
        _rewrite(gm, chain, prefix)
        result.matches += 1
        count(NAME)
    return finish(gm, result, before)
