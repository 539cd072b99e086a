"""linear_cross_entropy: the head's LM head -> cross-entropy chain becomes one
``grapefx.linear_cross_entropy`` node, so the (N, V) logits are never materialised (MATH.md §6).

    pattern (``compiler/lower/model.py`` ``build_head``)        replacement
    ------------------------------------------------------      ------------------------------------------
    z    = F.linear(h, w)                 (B, T, V), h's dtype   loss = grapefx.linear_cross_entropy(
    [z   = z.float()]                     fp32 statistics                 h.flatten(0, -2), w,
    zf   = z.reshape(-1, V)                                               targets.reshape(-1), ignore_index)
    loss = F.cross_entropy(zf, targets.reshape(-1), ignore_index=I)

The op computes z in h's dtype and the logsumexp in fp32 (fp64 for fp64 inputs) chunk by chunk:
the same function (``compiler/ops/linear_cross_entropy.py``). Declined (with a reason): a bias on
the linear, h and w of different dtypes, a cast other than ``.float()`` between the two, any other
``cross_entropy`` argument than ``ignore_index`` (weights, label smoothing, a reduction other than
the mean), or an intermediate (the logits) used anywhere else.

This pass runs on the HEAD graph (``model.head``; ``graph="head"`` in ``compiler.passes.PASSES``),
not on block graphs: the generator slices the lowered head at its logits (``runtime/generate.py``),
so the lowering keeps the explicit chain and the training build fuses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from compiler.passes.match import PassResult, Reason, arg, count, finish, is_op, only_user

NAME = "linear_cross_entropy"
LCE = torch.ops.grapefx.linear_cross_entropy
_CROSS_ENTROPY = (F.cross_entropy, torch.nn.functional.cross_entropy)
_ALLOWED_CE_KWARGS = {"ignore_index", "reduction", "weight", "label_smoothing"}


def _is_flatten_rows(node, of) -> bool:
    """``of.reshape(-1, V)`` / ``of.reshape(-1)`` / ``of.view(...)``: rows flattened, last dim kept."""
    if not (is_op(node, "reshape") or is_op(node, "view")) or node.args[0] is not of:
        return False
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    return len(rest) in (1, 2) and rest[0] == -1 and all(isinstance(r, int) for r in rest)


def _match(ce: fx.Node) -> tuple | Reason:
    """(h, w, targets, ignore_index, nodes of the chain) or why the candidate is declined."""
    extra = set(ce.kwargs) - _ALLOWED_CE_KWARGS
    if len(ce.args) > 2 or extra:
        return Reason("ce_arguments", "cross_entropy with positional options or unknown keywords")
    if ce.kwargs.get("weight") is not None or ce.kwargs.get("label_smoothing", 0.0) != 0.0 \
            or ce.kwargs.get("reduction", "mean") != "mean":
        return Reason("ce_options",
                      "cross_entropy with class weights, label smoothing or a reduction other than the mean")
    ignore_index = ce.kwargs.get("ignore_index", -100)
    flat, tflat = ce.args[0], arg(ce, 1, "target")
    if not isinstance(flat, fx.Node) or not (is_op(flat, "reshape") or is_op(flat, "view")):
        return Reason("ce_input_not_flat", "the cross-entropy input is not the flattened logits")
    z = flat.args[0]
    if not _is_flatten_rows(flat, z) or len(flat.args[1:]) == 0:
        return Reason("logits_not_flat", "the logits are not flattened to (-1, V)")
    chain = [flat]
    if is_op(z, "float"):
        chain.append(z)
        z = z.args[0]
    lin = z
    if not (isinstance(lin, fx.Node) and lin.op == "call_function" and lin.target in (F.linear, torch.nn.functional.linear)):
        return Reason("logits_not_linear",
                      "the logits do not come from F.linear (or are cast to something other than fp32)")
    if len(lin.args) > 2 and lin.args[2] is not None or lin.kwargs.get("bias") is not None:
        return Reason("lm_head_bias", "the LM head has a bias")
    chain.append(lin)
    for a, b in zip(chain[1:], chain[:-1]):
        if not only_user(a, b):
            return Reason("logits_escape", "the logits are used elsewhere")
    if not only_user(flat, ce):
        return Reason("logits_escape", "the logits are used elsewhere")
    if not (isinstance(tflat, fx.Node) and _is_flatten_rows(tflat, tflat.args[0]) and len(tflat.args[1:]) == 1):
        return Reason("targets_not_flat", "the targets are not flattened to (-1,)")
    h, w = lin.args[0], arg(lin, 1, "weight")
    hv, wv = h.meta.get("val"), w.meta.get("val") if isinstance(w, fx.Node) else None
    if hv is not None and wv is not None and hv.dtype != wv.dtype:
        return Reason("dtypes_differ", "the hidden states and the LM head weight have different dtypes")
    return h, w, tflat, ignore_index


def linear_cross_entropy_pass(gm: fx.GraphModule) -> PassResult:
    """Fuse the head's ``F.linear -> [float] -> reshape -> cross_entropy`` chain of ``gm`` in place."""
    result = PassResult(NAME)
    before = list(gm.graph.nodes)
    candidates = [n for n in before if n.op == "call_function" and n.target in _CROSS_ENTROPY]
    if not candidates:
        result.absent = Reason("absent", "no cross_entropy in the graph")
    for ce in candidates:
        found = _match(ce)
        if isinstance(found, str):
            result.declined.append(found)
            continue
        h, w, tflat, ignore_index = found
        g = gm.graph
        with g.inserting_before(ce):
            rows = g.create_node("call_method", "flatten", (h, 0, -2), name="head_hidden_rows")        # (N, C)
            fused = g.create_node("call_function", LCE, (rows, w, tflat, ignore_index), name="head_ce_fused")
        fused.meta["grapefx_fused"] = [NAME]
        ce.replace_all_uses_with(fused)
        result.matches += 1
        count(NAME)
    return finish(gm, result, before)

