"""concat_linear: linear maps of one input become one GEMM over their stacked weights.

    pattern                              replacement
    ------------------------------       ----------------------------------------------------------
    y_1 = F.linear(x, W_1)               W = cat([W_1, ..., W_n], 0)                    (N_1+...+N_n, C)
    ...                                  y_1, ..., y_n = split(F.linear(x, W), [N_1, ..., N_n], -1)
    y_n = F.linear(x, W_n)

(``separate_linears`` / ``stacked_linear`` below, as eager math.) Every output element is the same
dot product over the same C inputs; only the GEMM that computes it changes (a different kernel may
sum C in another order, so results agree to rounding, not bit for bit). The backward follows: the
input gradient sum_i dy_i W_i is one GEMM over K = N_1+...+N_n (one rounding instead of n products
rounded, then added), and the weight gradients are one GEMM whose rows are split back to W_1..W_n.

Produced by the q, k, v projections of a GQA layer (N = Hq*D, Hkv*D, Hkv*D: on baseline.yaml one
GEMM of N = 1536 instead of 1024, 256 and 256), the gate and up projections of a SwiGLU (the shared
experts, the dense FFN) and TPA's factor projections. The outputs are slices of one buffer
(``split`` makes views), which the head views and the attention kernels read through their strides.

Runs on the block graphs, after the attention passes (it needs none of them and changes nothing
they match: they start at the projections' outputs). Safety (``_unsafe``; declines quietly): at
least two linears read x, none has a bias, the weights are 2-D of one dtype and device with x's
last dimension as their inputs. Only linears whose weights exist before the first of them are
stacked (the stacked weight is built there, so nothing moves; ``_runs``).
"""

from __future__ import annotations

import operator
import os

import torch
import torch.nn.functional as F
from torch import fx

from compiler.passes.match import PassResult, Reason, arg, count, dtype, finish, infer_meta, is_op, shape, val

NAME = "concat_linear"


def separate_linears(x: torch.Tensor, *weights: torch.Tensor) -> list[torch.Tensor]:
    """The pattern: one GEMM per weight."""
    return [F.linear(x, w) for w in weights]


def stacked_linear(x: torch.Tensor, *weights: torch.Tensor) -> list[torch.Tensor]:
    """The replacement: one GEMM over the stacked weights, its columns split back."""
    y = F.linear(x, torch.cat(weights, 0))
    return list(torch.split(y, [w.shape[0] for w in weights], -1))


def _weight(node: fx.Node) -> fx.Node:
    return arg(node, 1, "weight")


def _runs(linears: list[fx.Node], order: dict[fx.Node, int]) -> list[list[fx.Node]]:
    """The linears of one input (graph order) in groups whose weights all exist before the group's first
    linear: a linear whose weight is computed after it starts a new group (in an fp32 graph the router
    reads the same tokens as the shared experts, and their weights come after the router's GEMM)."""
    groups: list[list[fx.Node]] = []
    for node in linears:
        w = _weight(node)
        if groups and not (isinstance(w, fx.Node) and order[w] > order[groups[-1][0]]):
            groups[-1].append(node)
        else:
            groups.append([node])
    return groups


def _unsafe(x: fx.Node, linears: list[fx.Node]) -> Reason | None:
    weights = [_weight(n) for n in linears]
    if any(arg(n, 2, "bias") is not None for n in linears):
        return Reason("bias", "a linear map of this input has a bias")
    C = (shape(x) or (None,))[-1]
    if any(shape(w) is None or len(shape(w)) != 2 or shape(w)[1] != C for w in weights):
        return Reason("weight_shape", f"a weight is not a 2-D (N, {C}) matrix over the input's last dimension")
    if len({dtype(w) for w in weights}) != 1 or len({val(w).device for w in weights}) != 1:
        return Reason("weight_dtype", "the weights differ in dtype or device")
    return None


def _stem(names: list[str]) -> str:
    """A name for the stacked nodes: ['layer1_attn_q_proj', 'layer1_attn_k_proj', ...] -> 'layer1_attn_qkv'."""
    names = [n.removesuffix("_proj") for n in names]
    head = names[0][:len(os.path.commonprefix(names))]
    head = head[:head.rfind("_") + 1]
    tails = [n[len(head):] for n in names]
    return head + ("".join(tails) if all(len(t) == 1 for t in tails) else "_".join(tails))


def concat_linear_pass(gm: fx.GraphModule) -> PassResult:
    """Stack the weights of every group of bias-free linear maps of one input in ``gm``, in place."""
    result = PassResult(NAME)
    before = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(before)}
    readers: dict[fx.Node, list[fx.Node]] = {}
    for node in before:
        if is_op(node, "linear") and isinstance(arg(node, 0, "input"), fx.Node):
            readers.setdefault(arg(node, 0, "input"), []).append(node)
    groups = [(x, run) for x, linears in readers.items() for run in _runs(linears, order) if len(run) > 1]
    if not groups:
        result.absent = Reason("absent", "no input feeds two or more linear maps (whose weights exist before them)")
    g = gm.graph
    for x, linears in groups:
        reason = _unsafe(x, linears)
        if reason is not None:
            result.declined.append(reason)
            continue
        weights = [_weight(n) for n in linears]
        stem = _stem([n.name for n in linears])
        with g.inserting_before(linears[0]):
            stacked = g.create_node("call_function", torch.cat, (weights, 0), name=f"{stem}_weight")
            y = g.create_node("call_function", F.linear, (x, stacked), name=f"{stem}_proj")
            parts = g.create_node("call_function", torch.split, (y, [shape(w)[0] for w in weights], -1),
                                  name=f"{stem}_split")
            for node in (stacked, y, parts):
                infer_meta(node)
            y.meta["grapefx_fused"] = [NAME]
            for i, old in enumerate(linears):
                piece = g.create_node("call_function", operator.getitem, (parts, i), name=f"{old.name}_part")
                infer_meta(piece)
                piece.meta.update({k: v for k, v in old.meta.items() if k != "val"})
                old.replace_all_uses_with(piece)
        for old in linears:
            gm.graph.erase_node(old)
        result.matches += 1
        count(NAME)
    return finish(gm, result, before)
