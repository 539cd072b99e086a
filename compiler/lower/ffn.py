"""FFN sub-graphs: dense SwiGLU and the DeepSeek-V3 mixture of experts (MATH.md §5).

MoE, per token t (N = B*T tokens, E routed experts, K chosen):

    logits  = h W_r^T                          (N, E) fp32 (router weight kept fp32; ops.router.router_logits)
    s       = sigmoid(logits)                  (N, E) fp32     [softmax: see below]
    choice  = s + b                            expert_bias b steers the choice only
    idx     = top-k(choice)                    (N, K) ties to the lower index; group-limited
    gates   = s[idx] / sum(s[idx]) * scale     unbiased; normalised only when K > 1
    y       = sum_k gates_k * SwiGLU_idx_k(h) + SwiGLU_shared(h)
    counts  = tokens per expert                (E,) fp32, a graph OUTPUT: the trainer reduces
                                               them over micro-batches/ranks and updates b

softmax scoring (comparison only): pre_softmax picks top-k of softmax(logits); otherwise top-k
of the logits and a softmax over the chosen K (Megatron's default order).

Expert parallelism (``parallel.expert`` E > 1) or a capacity factor: the routed experts become

    rows, local, order, splits, dropped = expert_dispatch(h, idx)    rows to the experts' ranks
    y_rows = expert_ffn(rows, local, 1)                              this rank's X/E experts
    y      = expert_combine(y_rows, gates, order, splits)            back, gate-weighted sum

(``compiler.ops.expert_parallel``); the block holds experts [e*X/E, (e+1)*X/E) of rank e of its
expert group, sliced from the same initial values as the whole stack (the state-dict key keeps
its name, the first dimension is X/E), and with a capacity factor the block's fourth output
is the count of dropped assignments. The router, the shared experts and the rest are unchanged.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.lower.builder import GraphBuilder, tag
from compiler.lower.common import weight
from compiler.lower.init import Initializer
from compiler.ops.router import router_logits
from spec.schema import MoE, Parallel

ops = torch.ops.grapefx


class ExpertGroup(NamedTuple):
    """Where this process sits in its expert group: the process group's name ('' = no job) and rank e."""
    name: str = ""
    rank: int = 0


def swiglu(b: GraphBuilder, name: str, h: fx.Node, w_gate: fx.Node, w_up: fx.Node, w_down: fx.Node) -> fx.Node:
    """SwiGLU(h) = (silu(h W_gate^T) * (h W_up^T)) W_down^T."""
    g = b(f"{name}_gate", F.silu, b(f"{name}_gate_proj", F.linear, h, w_gate))
    u = b(f"{name}_up_proj", F.linear, h, w_up)
    return b(f"{name}_down_proj", F.linear, b(f"{name}_act", torch.mul, g, u), w_down)


def lower_dense_ffn(b: GraphBuilder, h: fx.Node, *, C: int, hidden: int, name: str, init: Initializer,
                    cd: torch.dtype) -> fx.Node:
    w_gate = weight(b, "ffn.w_gate", init.normal(f"{name}.ffn.w_gate", (hidden, C)), cd)
    w_up = weight(b, "ffn.w_up", init.normal(f"{name}.ffn.w_up", (hidden, C)), cd)
    w_down = weight(b, "ffn.w_down", init.normal(f"{name}.ffn.w_down", (C, hidden), output=True), cd)
    return swiglu(b, "ffn", h, w_gate, w_up, w_down)


def lower_moe(b: GraphBuilder, h: fx.Node, moe: MoE, *, C: int, name: str, init: Initializer,
              cd: torch.dtype, parallel: Parallel | None = None,
              group: ExpertGroup | None = None) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node | None]:
    """Append the MoE math; returns (y (B, T, C), counts (E,) fp32, aux_loss () fp32, dropped () fp32 or None).

    ``group`` given and ``parallel.expert`` > 1, or a capacity factor: the dispatch / combine path
    of the module docstring; ``group`` None: one process holds every expert (parallel.expert is
    how a training job was split, not what this model computes). ``dropped``: None without a
    capacity factor."""
    r, E, K, F_ = moe.router, moe.experts, moe.top_k, moe.expert_hidden
    shape = b.method("moe_in_shape", "size", h)
    flat = b.method("moe_tokens", "reshape", h, -1, C)                                     # (N, C)

    # router, fp32 end to end (MATH.md §5-6)
    w_r = b.param("moe.router.weight", init.normal(f"{name}.moe.router.weight", (E, C)))
    logits = b("moe_router_logits", router_logits, flat, w_r)                              # (N, E) fp32
    if r.score_function == "sigmoid":
        scores = b("moe_router_scores", torch.sigmoid, logits)                              # (N, E)
    elif r.pre_softmax:
        scores = b("moe_router_scores", torch.softmax, logits, -1)
    else:
        scores = logits  # top-k on logits, softmax over the chosen K below
    choice = scores
    if r.expert_bias:
        bias = b.param("moe.expert_bias", torch.zeros(E, dtype=torch.float32), trainable=False)
        choice = b("moe_router_choice", torch.add, scores, bias)                            # s + b
    topk = b("moe_router_topk", ops.router_topk, choice, K, r.num_groups, r.group_topk)
    idx = tag(b.getitem("moe_expert_index", topk, 0), "moe.expert_index")                   # (N, K) int64
    counts = b.getitem("moe_expert_counts", topk, 1)                                        # (E,) fp32
    gates = b("moe_gates_unbiased", torch.gather, scores, 1, idx)                          # (N, K) fp32
    if r.score_function == "softmax" and not r.pre_softmax:
        gates = b("moe_gates_softmax", torch.softmax, gates, -1)
    elif K > 1:
        gates = b("moe_gates_normalised", torch.div, gates,
                  b.method("moe_gates_sum", "sum", gates, -1, keepdim=True))
    if r.topk_scaling_factor != 1.0:
        gates = b("moe_gates_scaled", torch.mul, gates, r.topk_scaling_factor)
    gates_c = gates if cd == torch.float32 else b.method("moe_gates_c", "to", gates, cd)

    parallel = parallel or Parallel()
    P = parallel.expert if group is not None else 1
    group = group or ExpertGroup()
    mine = slice(group.rank * E // P, (group.rank + 1) * E // P)                          # this rank's experts

    def experts(key: str, shape: tuple[int, ...], output: bool = False) -> fx.Node:
        """This rank's slice of the whole stack's initial values (a copy: the stack is not kept), as the
        fp32 master: the expert op rounds its weights to the compute dtype itself, and returns their
        gradients rounded to it in fp32, with no cast kernel on either side (compiler/ops/experts.py)."""
        return b.param(key, init.normal(f"{name}.{key}", shape, output=output)[mine].clone())

    w_gate = experts("moe.experts.w_gate", (E, C, F_))                                    # (E/P, C, F)
    w_up = experts("moe.experts.w_up", (E, C, F_))
    w_down = experts("moe.experts.w_down", (E, F_, C), output=True)                       # (E/P, F, C)
    dropped = None
    if P == 1 and parallel.capacity_factor is None:
        y = b("moe_routed", ops.expert_ffn, flat, idx, gates_c, w_gate, w_up, w_down)      # (N, C)
    else:
        sent = b("moe_dispatch", ops.expert_dispatch, flat, idx, E, P, group.name, parallel.capacity_factor or 0.0)
        rows = b.getitem("moe_dispatch_rows", sent, 0)                                      # (R, C) received
        local = b.method("moe_dispatch_experts", "view", b.getitem("moe_dispatch_local", sent, 1), -1, 1)  # (R, 1)
        order, splits = b.getitem("moe_dispatch_order", sent, 2), b.getitem("moe_dispatch_splits", sent, 3)
        ones = b("moe_row_gates", torch.ones_like, local, dtype=cd)                         # (R, 1)
        y_rows = b("moe_expert_rows", ops.expert_ffn, rows, local, ones, w_gate, w_up, w_down)   # (R, C)
        back = b("moe_combine", ops.expert_combine, y_rows, gates_c, order, splits, group.name)
        y = b.getitem("moe_routed", back, 0)                                                # (N, C)
        if parallel.capacity_factor is not None:
            dropped = b.getitem("moe_dropped", sent, 4)                                     # () fp32

    if moe.shared_experts:
        Fs = moe.shared_experts * F_
        s_gate = weight(b, "moe.shared.w_gate", init.normal(f"{name}.moe.shared.w_gate", (Fs, C)), cd)
        s_up = weight(b, "moe.shared.w_up", init.normal(f"{name}.moe.shared.w_up", (Fs, C)), cd)
        s_down = weight(b, "moe.shared.w_down", init.normal(f"{name}.moe.shared.w_down", (C, Fs), output=True), cd)
        y = b("moe_out", torch.add, y, swiglu(b, "moe_shared", flat, s_gate, s_up, s_down))
    y = b.method("moe_out_tokens", "view", y, shape)                                        # (B, T, C)

    aux = _aux_losses(b, moe, logits, scores, idx, counts, h, E=E, K=K)
    return y, counts, aux, dropped


def _aux_losses(b: GraphBuilder, moe: MoE, logits: fx.Node, scores: fx.Node, idx: fx.Node, counts: fx.Node,
                h: fx.Node, *, E: int, K: int) -> fx.Node:
    """seq_aux / aux / z-loss terms (MATH.md §5), fp32 scalar; a zero when all are off."""
    r = moe.router
    terms = []
    if r.load_balancing != "none":
        if r.score_function == "sigmoid":
            probs = b("moe_aux_probs", torch.div, scores, b.method("moe_aux_probs_sum", "sum", scores, -1, keepdim=True))
        else:
            probs = b("moe_aux_probs", torch.softmax, logits, -1)
    if r.load_balancing == "seq_aux":
        # f_i = E/(K T) #{t in the row: i in top-k of the UNBIASED s_t};  P_i = mean_t s_ti / sum_j s_tj
        bsz = b.method("moe_aux_bsz", "size", h, 0)
        unbiased = idx
        if r.expert_bias:
            unbiased = b.getitem("moe_aux_unbiased_index", b("moe_aux_unbiased_topk", ops.router_topk, scores, K,
                                                             r.num_groups, r.group_topk), 0)
        hits = b("moe_aux_hits", F.one_hot, b.method("moe_aux_rows", "reshape", unbiased, bsz, -1), E)  # (B, T*K, E)
        seqlen = b.method("moe_aux_seqlen", "size", h, 1)
        f = b("moe_aux_f", torch.mul, b.method("moe_aux_hit_counts", "sum", b.method("moe_aux_hits_f", "float", hits), 1),
              b("moe_aux_f_scale", operator.truediv, float(E), b("moe_aux_kt", operator.mul, seqlen, K)))   # (B, E)
        P = b.method("moe_aux_P", "mean", b.method("moe_aux_probs_rows", "reshape", probs, bsz, -1, E), 1)  # (B, E)
        seq = b.method("moe_aux_per_row", "sum", b("moe_aux_fP", torch.mul, f, P), -1)                    # (B,)
        terms.append(b("moe_seq_aux_loss", torch.mul, b.method("moe_aux_mean", "mean", seq), r.aux_coeff))
    elif r.load_balancing == "aux":
        # Switch / Megatron: alpha * E / (K N^2) * sum_i (sum_t p_ti) c_i
        n = b.method("moe_aux_tokens", "size", probs, 0)
        agg = b.method("moe_aux_prob_sum", "sum", probs, 0)                                             # (E,)
        scale = b("moe_aux_scale", operator.truediv, r.aux_coeff * E / K, b("moe_aux_n2", operator.mul, n, n))
        terms.append(b("moe_aux_loss", torch.mul, b.method("moe_aux_dot", "sum", b("moe_aux_pc", torch.mul, agg, counts)), scale))
    if r.z_loss_coeff:
        lse = b("moe_z_lse", torch.logsumexp, logits, -1)                                               # (N,)
        terms.append(b("moe_z_loss", torch.mul, b.method("moe_z_mean", "mean", b("moe_z_sq", torch.square, lse)), r.z_loss_coeff))
    if not terms:
        return b("moe_aux_zero", torch.zeros, (), device=b("moe_device", getattr, logits, "device"))
    total = terms[0]
    for i, t in enumerate(terms[1:]):
        total = b(f"moe_aux_total{i}", torch.add, total, t)
    return total
