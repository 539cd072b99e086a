"""Triton kernel of the router's expert selection (``compiler.ops.router.router_topk``, CUDA).

    indices, counts = router_topk(choice_scores, k)       (N, E) fp32 -> (N, k) int64, (E,) fp32

One program takes BLOCK_N = max(8, 2048 / E_P2) rows whole (E <= 256 columns, E_P2 the next power of
two) and picks the k best of each row by k max-reductions over the op's tie-free keys,

    key = ordered(s) * 2^32 + (E - 1 - j)       ordered: the fp32 bits as an int32 in the order of the
                                                values (negatives' magnitude bits flipped; -0 as +0)

removing each winner before the next reduction: best first, ties to the lower index, the same
indices as the op's ``torch.topk`` over the same keys. The program adds its rows' choices per
expert into ``counts`` (fp32 atomics of whole numbers below 2^24: exact in any order). Why: the op's
torch version is about a dozen launches per MoE layer (the key arithmetic, an int64 top-k at 52 us
for 16,384 x 64 scores on an H200, the counts), issued one by one from the op's Python body.
Group-limited routing (``num_groups > 1``) stays with the torch version.

Importing this module needs triton; ``compiler.kernels.register`` hands ``router_topk`` to
``compiler.ops.router`` where a GPU is present.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from compiler.kernels import launch

__all__ = ["router_topk", "MAX_EXPERTS"]

MAX_EXPERTS = 256
KEYS_PER_PROGRAM = 2048    # (BLOCK_N, E_P2) int64 keys in registers: 32 rows at E = 64 take 128 registers, no spills (sm90)
LOWEST = tl.constexpr(-2**63)   # below every real key


@triton.jit
def _router_topk_kernel(S, Idx, Counts, N, stride_s, E: tl.constexpr, E_P2: tl.constexpr, K: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                     # (BLOCK_N,)
    cols = tl.arange(0, E_P2)                                                     # (E_P2,)
    row_ok, col_ok = rows < N, cols < E
    s = tl.load(S + rows[:, None].to(tl.int64) * stride_s + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    bits = tl.where(s == 0.0, 0, s.to(tl.int32, bitcast=True))                    # -0 as +0 (they tie)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)                         # int32, ordered like the values
    rank = (E - 1 - cols).to(tl.int64)                                            # larger for lower indices
    key = (ordered.to(tl.int64) << 32) | rank[None, :]                            # (BLOCK_N, E_P2), distinct in a row
    lowest = tl.full([BLOCK_N, E_P2], LOWEST, tl.int64)
    key = tl.where(col_ok[None, :], key, lowest)
    chosen = tl.zeros([BLOCK_N, E_P2], tl.float32)
    for k in tl.static_range(K):
        best = tl.max(key, axis=1)                                                # (BLOCK_N,)
        j = (E - 1) - (best & (E_P2 - 1))                                         # its column (rank < E_P2)
        tl.store(Idx + rows.to(tl.int64) * K + k, j, mask=row_ok)
        hit = cols[None, :] == j[:, None]
        chosen += tl.where(hit & row_ok[:, None], 1.0, 0.0)
        key = tl.where(hit, lowest, key)
    tl.atomic_add(Counts + cols, tl.sum(chosen, axis=0), mask=col_ok)


def launch_rows(E: int) -> tuple[int, int]:
    """(E_P2, BLOCK_N) of a launch over E experts: the columns padded to a power of two, and the rows a
    program takes (``KEYS_PER_PROGRAM`` keys, at least 8 rows)."""
    e_p2 = triton.next_power_of_2(E)
    return e_p2, max(8, KEYS_PER_PROGRAM // e_p2)


def router_topk(choice_scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(indices (N, k) int64, counts (E,) fp32) of fp32 ``choice_scores`` (N, E), E <= ``MAX_EXPERTS``
    (the contract of ``grapefx::router_topk`` without group-limited routing)."""
    N, E = choice_scores.shape
    s = choice_scores if choice_scores.stride(1) == 1 else choice_scores.contiguous()
    indices = torch.empty(N, k, dtype=torch.int64, device=s.device)
    counts = torch.zeros(E, dtype=torch.float32, device=s.device)
    if N:
        e_p2, block_n = launch_rows(E)
        launch(_router_topk_kernel)[(triton.cdiv(N, block_n),)](
            s, indices, counts, N, s.stride(0), E=E, E_P2=e_p2, K=k, BLOCK_N=block_n, num_warps=4)
    return indices, counts
