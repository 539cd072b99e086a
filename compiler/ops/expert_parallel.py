"""Expert parallelism: move each token's rows to the rank that holds its expert, and back.

X routed experts are split over the E ranks of an expert group: rank e holds experts
[e*X/E, (e+1)*X/E) (``Xl = X/E`` of them). After the router of every rank has chosen
``indices`` (N, K) for its own N tokens:

    expert_dispatch(x, indices, experts=X, ranks=E, group, capacity_factor)
        ids    = indices.flatten()                       (N*K,) global expert of each assignment
        order  = stable argsort(ids)                     assignments grouped by expert, hence by owner
        [capacity c = ceil(capacity_factor * N*K / X): an expert keeps its first c assignments in
         token order, the rest are dropped (their output is 0) and counted]
        sent   = kept assignments per expert             (X,), reshaped (E, Xl): row r goes to rank r
        recv   = all_to_all(sent)                        (E, Xl): from each source rank, per local expert
        rows   = all_to_all_single(x[order // K], splits = sent.sum(1) out, recv.sum(1) in)
        -> rows (R, C) ordered by source rank then local expert, local (R,) int64 local expert of
           each row, order (S,) int64 the kept assignments t*K+k as sent, splits (2, E) int64 CPU
           [sent per rank; received per rank], dropped () fp32 assignments dropped here

    expert_combine(y, gates, order, splits, group)                y (R, C): expert outputs of rows
        back   = all_to_all_single(y, the splits reversed)        (S, C) in ``order``
        out[t] = sum over kept k of gates[t, k] * back[row of t*K+k]   (N, C), summed in fp32

The expert computation between them is ``expert_ffn`` on the received rows with one slot per
row and gate 1 (the gates are applied once, in the combine, on the token's own rank).

Autograd: the backward of an all-to-all is the all-to-all with the splits swapped. Dispatch:
d rows -> reverse exchange -> dx[t] += d row (t*K+k). Combine: d back = gates * d out[t],
dgates[t, k] = d out[t] . back, then the reverse exchange to the experts' ranks. The ranks of a
group issue the same exchanges in the same order (every rank runs every MoE layer), forward and
backward. ``group`` is a process-group name (``ProcessGroup.group_name``); the empty name means
one rank (no exchange: the capacity factor alone, or a graph dump without a job).

The counts exchange and ``.tolist()`` of the splits read the counts back to the host once per
layer and direction: variable splits need them (as in torchtitan and Megatron-Core's all-to-all
dispatcher).
"""

import math

import torch
import torch.distributed as dist
from torch import Tensor

from compiler.ops._util import expert_sort_keys


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def _exchange(t: Tensor, out_splits: list[int], in_splits: list[int], group: str) -> Tensor:
    """Rows ``t`` split by ``in_splits`` to the group's ranks; returns the rows received by ``out_splits``."""
    if not group:
        return t.clone()
    out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits, group=_group(group))
    return out


def _check(x: Tensor, indices: Tensor, experts: int, ranks: int, group: str) -> None:
    if x.dim() != 2 or indices.dim() != 2 or indices.shape[0] != x.shape[0] or indices.dtype != torch.int64:
        raise ValueError(f"expert_dispatch: need x (N, C) and int64 indices (N, K); got {tuple(x.shape)}, "
                         f"{tuple(indices.shape)} {indices.dtype}")
    if ranks < 1 or experts % ranks:
        raise ValueError(f"expert_dispatch: {experts} experts do not split over {ranks} ranks")
    size = dist.get_world_size(_group(group)) if group else 1
    if size != ranks:
        raise ValueError(f"expert_dispatch: the graph splits the experts over {ranks} ranks but its group "
                         f"{group!r} has {size}")


def _kept(ids_sorted: Tensor, per_expert: Tensor, capacity: int | None) -> Tensor | None:
    """Mask of the sorted assignments an expert keeps (its first ``capacity``), or None when dropless."""
    if capacity is None:
        return None
    starts = torch.cumsum(per_expert, 0) - per_expert                               # (X,) first sorted row
    rank_in_expert = torch.arange(ids_sorted.numel(), device=ids_sorted.device) - starts[ids_sorted]
    return rank_in_expert < capacity


@torch.library.custom_op("grapefx::expert_dispatch", mutates_args=())
def expert_dispatch(x: Tensor, indices: Tensor, experts: int, ranks: int, group: str,
                    capacity_factor: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Send each (token, chosen expert) row to the expert's rank (module docstring).

    x (N, C), indices (N, K) int64 global expert ids -> rows (R, C), local (R,) int64,
    order (S,) int64, splits (2, E) int64 (CPU), dropped () fp32. ``capacity_factor`` 0: dropless.
    """
    _check(x, indices, experts, ranks, group)
    E, (N, K) = ranks, indices.shape
    ids = indices.reshape(-1)
    order = torch.sort(expert_sort_keys(ids, experts), stable=True).indices        # (N*K,)
    ids_sorted = ids.index_select(0, order)
    per_expert = torch.bincount(ids, minlength=experts)                             # (X,)
    capacity = math.ceil(capacity_factor * N * K / experts) if capacity_factor > 0 else None
    kept = _kept(ids_sorted, per_expert, capacity)
    dropped = x.new_zeros((), dtype=torch.float32)
    if kept is not None:
        dropped = (~kept).sum().to(torch.float32)
        order, per_expert = order[kept], per_expert.clamp(max=capacity)
    sent = per_expert.view(E, experts // E)                                         # (E, Xl) to each rank
    recv = _exchange(sent, [1] * E, [1] * E, group)                                 # (E, Xl) from each rank
    splits = torch.stack([sent.sum(1), recv.sum(1)]).cpu()                          # (2, E)
    rows = _exchange(x.index_select(0, order // K), splits[1].tolist(), splits[0].tolist(), group)
    local = torch.repeat_interleave(torch.arange(experts // E, device=x.device).repeat(E), recv.reshape(-1),
                                    output_size=rows.shape[0])                    # (R,) local expert of each row
    return rows, local, order, splits, dropped


@expert_dispatch.register_fake
def _(x, indices, experts, ranks, group, capacity_factor=0.0):
    """R and S depend on the routing: unbacked sizes under torch.compile; where there is no shape
    environment to make them (shape propagation for the passes and the dumps), the dropless
    average N*K (a rank receives as many rows as it sends when the load is balanced)."""
    ctx = torch.library.get_ctx()
    try:
        R, S = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    except torch._subclasses.fake_tensor.DynamicOutputShapeException:
        R = S = indices.numel()
    return (x.new_empty(R, x.shape[1]), indices.new_empty(R), indices.new_empty(S),
            torch.empty(2, ranks, dtype=torch.int64, device="cpu"), x.new_empty((), dtype=torch.float32))


def _dispatch_setup(ctx, inputs, output):
    x, indices, _, _, group, _ = inputs
    _, local, order, splits, dropped = output
    ctx.save_for_backward(order, splits)
    ctx.N, ctx.K, ctx.group, ctx.dtype = x.shape[0], indices.shape[1], group, x.dtype
    ctx.mark_non_differentiable(local, order, splits, dropped)


def _dispatch_backward(ctx, d_rows, _d_local, _d_order, _d_splits, _d_dropped):
    order, splits = ctx.saved_tensors
    d_sent = _exchange(d_rows, splits[0].tolist(), splits[1].tolist(), ctx.group)   # (S, C), back in order
    dx = torch.zeros(ctx.N, d_sent.shape[1], dtype=torch.float32, device=d_sent.device)
    dx.index_add_(0, order // ctx.K, d_sent.float())                                 # the K rows of a token summed
    return dx.to(ctx.dtype), None, None, None, None, None


expert_dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("grapefx::expert_combine", mutates_args=())
def expert_combine_fwd(y: Tensor, gates: Tensor, order: Tensor, splits: Tensor, group: str) -> tuple[Tensor, Tensor]:
    """Bring the expert outputs back and sum them with the gates: -> (out (N, C) in y's dtype, back (S, C))."""
    back = _exchange(y, splits[0].tolist(), splits[1].tolist(), group)             # (S, C) in order
    N, K = gates.shape
    g = gates.reshape(-1).index_select(0, order).float()                            # (S,)
    out = torch.zeros(N, y.shape[1], dtype=torch.float32, device=y.device)
    out.index_add_(0, order // K, back.float() * g[:, None])
    return out.to(y.dtype), back


@expert_combine_fwd.register_fake
def _(y, gates, order, splits, group):
    return y.new_empty(gates.shape[0], y.shape[1]), y.new_empty(order.shape[0], y.shape[1])


def _combine_setup(ctx, inputs, output):
    _, gates, order, splits, group = inputs
    ctx.save_for_backward(gates, order, splits, output[1])
    ctx.group = group
    ctx.mark_non_differentiable(output[1])


def _combine_backward(ctx, d_out, _d_back):
    gates, order, splits, back = ctx.saved_tensors
    K = gates.shape[1]
    d_tok = d_out.float().index_select(0, order // K)                               # (S, C)
    g = gates.reshape(-1).index_select(0, order).float()
    d_gates = torch.zeros(gates.numel(), dtype=torch.float32, device=gates.device)
    d_gates.index_copy_(0, order, (d_tok * back.float()).sum(-1))
    d_back = (d_tok * g[:, None]).to(back.dtype)
    d_y = _exchange(d_back, splits[1].tolist(), splits[0].tolist(), ctx.group)      # (R, C) to the experts
    return d_y, d_gates.view_as(gates).to(gates.dtype), None, None, None


expert_combine_fwd.register_autograd(_combine_backward, setup_context=_combine_setup)


def expert_combine(y: Tensor, gates: Tensor, order: Tensor, splits: Tensor, group: str) -> Tensor:
    """``torch.ops.grapefx.expert_combine``'s output: the gate-weighted sum (N, C) of each token's expert rows."""
    return torch.ops.grapefx.expert_combine(y, gates, order, splits, group)[0]
