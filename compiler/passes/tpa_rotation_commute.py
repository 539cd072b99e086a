"""tpa_rotation_commute: in a TPA layer, the rotation of the B factors moves after the contraction,
so the rotated q and k feed the attention directly and ``rotary_attention`` can fold them (MATH.md §4).

Produced by layers with ``mechanism: tpa`` and a rotation (``position: {kind: grape-m}`` or
``rope``). The lowering (``compiler/lower/tpa.py``) rotates the rows of B_Q and B_K, (B, R, T, D),
before contracting them with the head factors A, (B, R, T, heads):

    pattern                                              replacement
    --------------------------------------------------   --------------------------------------------------
    einsum("brth,brtd->bhtd", a,                         grape_m_rotate(einsum("brth,brtd->bhtd", a, b),
           grape_m_rotate(b, theta, pos_offset))                        theta, pos_offset)

(``rotate_then_contract`` / ``contract_then_rotate`` below, as eager math.) This is a
canonicalisation: it makes a TPA layer's graph read like a GQA layer's (rotated q, k into the
attention chain), so one fusion pattern serves both mechanisms.

Exact: for every (batch, head h, token t), sum_r a[r, t, h] R(t theta) b[r, t, :] =
R(t theta) sum_r a[r, t, h] b[r, t, :], because the rotation R(t theta) acts on the D axis alone,
with angles that depend on the position t only (theta is shared by every head, MATH.md §2), and
the contraction mixes neither D nor t. Only the rounding differs (the rotation now follows the sum).

Runs first: it needs no other pass, and ``rotary_attention`` (after ``attention_formation``)
matches what it leaves. Safety (``_unsafe``; declines quietly): the einsum equation is exactly
``TPA_CONTRACTION``; the rotated B is its second operand and feeds nothing else (else both the
rotated and the unrotated factor would be needed); the rotation keeps the dtype and its theta is
a float (D/2,) vector; a and b share a dtype, so the contracted tensor has the rotation's input dtype.
"""

from __future__ import annotations

import torch
from torch import fx

from compiler.lower.tpa import TPA_CONTRACTION
from compiler.passes.match import PassResult, Reason, arg, count, dtype, finish, infer_meta, is_custom, shape

NAME = "tpa_rotation_commute"
ROTATE = torch.ops.grapefx.grape_m_rotate


def rotate_then_contract(a, b, theta, pos_offset: int = 0):
    """The pattern: a (B, R, T, heads), b (B, R, T, D) -> (B, heads, T, D), B rotated per token first."""
    return torch.einsum(TPA_CONTRACTION, a, ROTATE(b, theta, pos_offset))


def contract_then_rotate(a, b, theta, pos_offset: int = 0):
    """The replacement: contract, then rotate each head's (T, D) rows exactly as the attention chain expects."""
    return ROTATE(torch.einsum(TPA_CONTRACTION, a, b), theta, pos_offset)


def _is_contraction(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.einsum and len(node.args) == 3 and not node.kwargs


def _unsafe(contract: fx.Node) -> Reason | None:
    if contract.args[0] != TPA_CONTRACTION:
        return Reason("einsum_not_tpa",
                      f"the einsum is {contract.args[0]!r}, not the TPA contraction {TPA_CONTRACTION!r}")
    a, rot = contract.args[1], contract.args[2]
    if set(rot.users) != {contract}:
        return Reason("factor_escapes", "the rotated B factor is also used outside the contraction")
    b, theta = arg(rot, 0, "x"), arg(rot, 1, "theta")
    if dtype(b) != dtype(rot):
        return Reason("rotation_dtype", "the rotation changes the dtype")
    if dtype(a) != dtype(b):
        return Reason("factor_dtypes", f"the factors have different dtypes ({dtype(a)}, {dtype(b)})")
    D = shape(b)[-1]
    if shape(theta) != (D // 2,) or not dtype(theta).is_floating_point:
        return Reason("theta_shape", f"theta is {shape(theta)} {dtype(theta)}, not a float (D/2,) = ({D // 2},) vector")
    return None


def tpa_rotation_commute_pass(gm: fx.GraphModule) -> PassResult:
    """Move every rotation of a TPA B factor of ``gm`` after its contraction, in place."""
    result = PassResult(NAME)
    before = list(gm.graph.nodes)
    candidates = [n for n in before if _is_contraction(n) and is_custom(n.args[2], ROTATE)]
    if not candidates:
        result.absent = Reason("absent", "no contraction of a rotated factor (no TPA layer that rotates)")
    g = gm.graph
    for contract in candidates:
        reason = _unsafe(contract)
        if reason is not None:
            result.declined.append(reason)
            continue
        a, rot = contract.args[1], contract.args[2]
        rest = (arg(rot, 2, "pos_offset", 0),) if arg(rot, 2, "pos_offset", 0) != 0 else ()
        with g.inserting_before(contract):
            plain = g.create_node("call_function", torch.einsum, (TPA_CONTRACTION, a, arg(rot, 0, "x")),
                                  name=f"{contract.name}_unrotated")           # layer1_attn_q_unrotated
            infer_meta(plain)
            rotated = g.create_node("call_function", ROTATE, (plain, arg(rot, 1, "theta"), *rest),
                                    name=f"{contract.name}_rotated")
            infer_meta(rotated)
        contract.replace_all_uses_with(rotated)
        rotated.meta.setdefault("grapefx_fused", []).append(NAME)
        result.matches += 1
        count(NAME)
    return finish(gm, result, before)
