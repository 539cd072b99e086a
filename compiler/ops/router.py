"""The DeepSeek-V3 router: its fp32 logits and its expert selection (MATH.md §5).

``router_logits``: logits = x W_r^T in fp32 from bf16 tokens, at bf16 tensor-core speed on CUDA
(its docstring). ``router_topk``: deterministic top-k, optionally group-limited.

The selection reads the *biased* choice scores ``s + b``; gates are gathered from the unbiased
``s`` by the caller, so nothing here needs a gradient.

Ties go to the lower expert index, on every device: ``torch.topk`` promises no order among equal
values, so for fp32 scores it runs on int64 keys that cannot tie,

    key = ordered(s) * 2^32 + (M - 1 - j)        ordered: the fp32 bits as an int32 in the order of
                                                 the values (negatives' magnitude bits flipped; -0 as +0)

(the larger score wins, and among equal scores the lower index j); other dtypes take a stable
descending sort (equal scores keep their index order) and its first k columns. Both give the same
indices; the sort of a whole (N, E) row costs several times the top-k on a GPU. On CUDA, fp32 scores
without group-limited routing go to one Triton kernel over the same keys (``register_cuda_impl``,
``compiler.kernels.router``). Group-limited routing: the E experts form ``num_groups`` contiguous groups
of E / num_groups; a group's score is the sum of its top ``k // group_topk`` scores; the best
``group_topk`` groups are kept (ties to the lower group index) and the others masked to -inf
before the top-k.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from compiler.ops._util import compute_dtype

# mm with bf16 inputs and an fp32 result (fp32 accumulation, no rounding to bf16): CUDA only
_MM_FP32_OUT = "dtype" in torch.ops.aten.mm.overloads()


def _split_bf16(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 t as three bf16 parts with t == hi + mid + lo exactly.

    Each part is what the ones before it leave, cut to its top 16 bits (sign, exponent and the 7
    leading fraction bits: a bf16 number, so the casts are exact), and the remainders are exact fp32
    differences; 8 + 8 + 8 significant bits hold fp32's 24. Cutting, not rounding: Inductor drops a
    rounding cast followed by the cast back inside one kernel, which would leave mid = lo = 0.
    """
    hi = _top16(t)
    rest = t - hi
    mid = _top16(rest)
    return hi.to(torch.bfloat16), mid.to(torch.bfloat16), (rest - mid).to(torch.bfloat16)


def _top16(t: Tensor) -> Tensor:
    """fp32 t with the low 16 bits of each number cleared (rounded towards zero to a bf16 value)."""
    return (t.view(torch.int32) & -65536).view(torch.float32)


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b of bf16 matrices as fp32: every product of two bf16 numbers is exact in fp32 and the sums
    are fp32 (cuBLAS's mm with out_dtype on CUDA; on other devices the same numbers via fp32 inputs)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class _SplitLogits(torch.autograd.Function):
    """x W^T (x bf16 (N, C), W fp32 (E, C)) as bf16 GEMMs over the split of W; ``router_logits``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        E = weight.shape[0]
        parts = torch.cat(_split_bf16(weight))                               # (3E, C) bf16: hi; mid; lo
        ctx.save_for_backward(x, parts)
        return _mm_fp32(x, parts.t()).view(-1, 3, E).sum(1)                  # (N, E) fp32

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, parts = ctx.saved_tensors
        E = grad.shape[1]
        hi, mid, _ = parts.split(E)
        g_hi, g_mid, g_lo = _split_bf16(grad)                                # (N, E) bf16 each
        dx = torch.cat([g_hi, g_hi, g_mid], 1) @ torch.cat([hi, mid, hi])     # (N, C) bf16
        dw = _mm_fp32(torch.cat([g_hi, g_mid, g_lo], 1).t(), x)              # (3E, C) fp32
        return dx, dw.view(3, E, -1).sum(0)


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """logits = x W_r^T, (N, E) fp32, from the tokens x (N, C) and the fp32 router weight W_r (E, C).

    bf16 x on CUDA: three bf16 GEMMs give the fp32 product,

        W_r = W_hi + W_mid + W_lo              exactly (``_split_bf16``)
        x W_r^T = x [W_hi; W_mid; W_lo]^T      one (N, 3E) fp32 GEMM result, summed over its E-blocks

    bf16 x bf16 products are exact in fp32 and the tensor cores sum in fp32, so this is the fp32
    GEMM of the bf16 tokens up to the order of its sums. Backward, with g = dL/dlogits (fp32):

        dW_r = g^T x   from [g_hi | g_mid | g_lo]^T x, fp32, summed over the E-blocks    (as exact)
        dx   = g W_r   from [g_hi | g_hi | g_mid] [W_hi; W_mid; W_hi], rounded to bf16 once

    dx leaves out the three terms smaller than 2^-16 of the product, under its bf16 rounding
    (2^-9). Why: the fp32 GEMMs with E = 64 columns ran at 30-37 TFLOP/s on an H100, 4.7 ms of a
    baseline.yaml step, and the fp32 copy of x they read is no longer made (nor kept for the
    backward). Any other case (fp32 x, CPU): ``F.linear`` of the two in fp32 (fp64 when either is fp64).
    """
    if x.is_cuda and _MM_FP32_OUT and x.dtype == torch.bfloat16 and weight.dtype == torch.float32:
        return _SplitLogits.apply(x, weight)
    dt = compute_dtype(x.dtype, weight.dtype)
    return F.linear(x.to(dt), weight.to(dt))


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


_cuda_topk = None                 # compiler.kernels.router.router_topk: see register_cuda_impl
_cuda_max_experts = 0
_traced_topk = None               # compiler.kernels.router_ops.router_select_triton


def register_cuda_impl(topk, max_experts: int = 0, traced=None) -> None:
    """Route ``router_topk`` of fp32 CUDA scores without group-limited routing, E <= ``max_experts``, to
    ``topk(choice_scores, k) -> (indices, counts)`` (same contract), launched from the opaque
    ``grapefx::router_select``'s body; or, given ``traced`` (the same function as a ``triton_op``), to
    ``traced``, which torch.compile decomposes into the launch. ``None`` unregisters both.
    ``compiler.kernels`` calls this."""
    global _cuda_topk, _cuda_max_experts, _traced_topk
    _cuda_topk, _cuda_max_experts = topk, max_experts
    _traced_topk = None if topk is None else traced


def _kernel_applies(choice_scores: Tensor, num_groups: int) -> bool:
    """Whether the registered kernel takes these (checked) scores: fp32 on CUDA, no group limit, E <= its limit."""
    return (choice_scores.is_cuda and choice_scores.dtype == torch.float32 and num_groups == 1
            and choice_scores.shape[1] <= _cuda_max_experts)


@torch.library.custom_op("grapefx::router_select", mutates_args=())
def router_select(choice_scores: Tensor, k: int, num_groups: int, group_topk: int) -> tuple[Tensor, Tensor]:
    """The opaque ``router_topk``: the registered kernel launched from here where it applies, else the
    torch version below. Same arguments and results as ``router_topk``."""
    _check(choice_scores, k, num_groups, group_topk)
    N, E = choice_scores.shape
    if _cuda_topk is not None and _kernel_applies(choice_scores, num_groups):
        return _cuda_topk(choice_scores, k)
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


@router_select.register_fake
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
router_select.register_autograd(_backward, setup_context=_setup_context)

# The public op: what the lowering writes into the MoE graphs.
_lib = torch.library.Library("grapefx", "FRAGMENT")
_lib.define("router_topk(Tensor choice_scores, int k, int num_groups, int group_topk) -> (Tensor, Tensor)")


def _router_topk_dispatch(choice_scores, k, num_groups, group_topk):
    _check(choice_scores, k, num_groups, group_topk)
    if _traced_topk is not None and _kernel_applies(choice_scores, num_groups):
        return _traced_topk(choice_scores.detach(), k)        # detach: no gradient, as router_select's outputs
    return torch.ops.grapefx.router_select(choice_scores, k, num_groups, group_topk)


_lib.impl("router_topk", _router_topk_dispatch, "CompositeImplicitAutograd")


def router_topk(choice_scores: Tensor, k: int, num_groups: int, group_topk: int) -> tuple[Tensor, Tensor]:
    """``torch.ops.grapefx.router_topk``: top-k experts per token and tokens per expert (MATH.md §5).

    choice_scores (N, E) fp32 (the biased scores s + b). Returns indices (N, k) int64, best
    first, ties to the lower index, and counts (E,) fp32 = tokens routed to each expert
    (sum = N * k). ``num_groups > 1`` turns on group-limited routing. No gradient.

    On CUDA with the kernels registered (fp32, no group limit, E <= 256) it is the traced
    ``grapefx::router_select_triton``, which torch.compile decomposes into the kernel's launch;
    everywhere else the opaque ``grapefx::router_select``.
    """
    return torch.ops.grapefx.router_topk(choice_scores, k, num_groups, group_topk)
