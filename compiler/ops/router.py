"""The DeepSeek-V3 router's expert selection: deterministic top-k, optionally group-limited (MATH.md §5).

The selection reads the *biased* choice scores ``s + b``; gates are gathered from the unbiased
``s`` by the caller, so nothing here needs a gradient.

Ties go to the lower expert index, on every device: ``torch.topk`` promises no order among equal
values, so for fp32 scores it runs on int64 keys that cannot tie,

    key = ordered(s) * 2^32 + (M - 1 - j)        ordered: the fp32 bits as an int32 in the order of
                                                 the values (negatives' magnitude bits flipped; -0 as +0)

(the larger score wins, and among equal scores the lower index j); other dtypes take a stable
descending sort (equal scores keep their index order) and its first k columns. Both give the same
indices; the sort of a whole (N, E) row costs several times the top-k on a GPU. Group-limited routing: the E experts form ``num_groups`` contiguous groups
of E / num_groups; a group's score is the sum of its top ``k // group_topk`` scores; the best
``group_topk`` groups are kept (ties to the lower group index) and the others masked to -inf
before the top-k.
"""

import torch
from torch import Tensor


def _check(scores: Tensor, k: int, num_groups: int, group_topk: int) -> None:
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"router_topk: choice_scores must be a float (N, E) matrix, got {tuple(scores.shape)} {scores.dtype}")
    E = scores.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"router_topk: need 1 <= k <= E = {E}, got k = {k}")
    if num_groups < 1:
        raise ValueError(f"router_topk: num_groups must be >= 1 (1 = no group limit), got {num_groups}")
    if num_groups > 1:
        if E % num_groups:
            raise ValueError(f"router_topk: E = {E} experts do not split into {num_groups} equal groups")
        if not 1 <= group_topk <= num_groups or k < group_topk:
            raise ValueError(f"router_topk: need 1 <= group_topk <= num_groups ({num_groups}) and group_topk <= k ({k}); "
                             f"got group_topk = {group_topk}")
        if k > group_topk * (E // num_groups):
            raise ValueError(f"router_topk: the best {group_topk} groups of {E // num_groups} experts hold fewer than k = {k}")


def _topk_lower_index(x: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of each row, ties to the lower index. (R, M) -> (R, k) int64.

    fp32: one ``torch.topk`` over tie-free int64 keys (module docstring); else a stable sort.
    """
    if x.dtype != torch.float32:
        return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k].contiguous()
    M = x.shape[-1]
    bits = (x + 0.0).view(torch.int32)                                  # + 0.0: -0 becomes +0 (they tie)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)                        # int32, ordered like the values
    rank = M - 1 - torch.arange(M, device=x.device, dtype=torch.int64)  # (M,) larger for lower indices
    keys = (ordered.to(torch.int64) << 32) | rank                       # (R, M), all distinct in a row
    return (M - 1) - (torch.topk(keys, k, dim=-1).values & 0xFFFFFFFF)


@torch.library.custom_op("grapefx::router_topk", mutates_args=())
def router_topk(choice_scores: Tensor, k: int, num_groups: int, group_topk: int) -> tuple[Tensor, Tensor]:
    """Top-k experts per token and tokens per expert (MATH.md §5).

    choice_scores (N, E) fp32 (the biased scores s + b). Returns indices (N, k) int64, best
    first, ties to the lower index, and counts (E,) fp32 = tokens routed to each expert
    (sum = N * k). ``num_groups > 1`` turns on group-limited routing. No gradient.
    """
    _check(choice_scores, k, num_groups, group_topk)
    N, E = choice_scores.shape
    scores = choice_scores
    if num_groups > 1:
        grouped = scores.reshape(N, num_groups, E // num_groups)                             # (N, groups, E/groups)
        group_score = torch.topk(grouped, k // group_topk, dim=-1).values.sum(-1)            # (N, groups); values need no tie rule
        keep = _topk_lower_index(group_score, group_topk)                                    # (N, group_topk)
        allowed = torch.zeros(N, num_groups, dtype=torch.bool, device=scores.device).scatter_(1, keep, True)
        scores = grouped.masked_fill(~allowed[..., None], float("-inf")).reshape(N, E)       # (N, E)
    indices = _topk_lower_index(scores, k)                                                   # (N, k)
    # counts by comparison: CUDA's bincount reads max() back to the host (a sync per MoE layer), and an
    # index_add_ of N*k ones queues on E atomics; a (N*k, E) boolean sum does neither and is exact
    flat = indices.reshape(-1)                                                               # (N*k,)
    experts = torch.arange(E, device=flat.device)
    counts = (flat[:, None] == experts).sum(0).to(torch.float32)                             # (E,)
    return indices, counts


@router_topk.register_fake
def _(choice_scores, k, num_groups, group_topk):
    _check(choice_scores, k, num_groups, group_topk)
    N, E = choice_scores.shape
    return (choice_scores.new_empty(N, k, dtype=torch.int64),
            choice_scores.new_empty(E, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _backward(ctx, grad_indices, grad_counts):
    return None, None, None, None


# Registered so that scores which require grad (the router's) pass through cleanly: both
# outputs are marked non-differentiable, so this backward never runs.
router_topk.register_autograd(_backward, setup_context=_setup_context)
