"""The router's selection kernel (compiler.kernels.router) against the op's torch version (same keys, so
the same indices) and a hand-worked row. CPU: Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported); skipped where triton is missing (CI)."""

import pytest
import torch

from triton_interpreter import on_gpu_or_interpreter

ON_GPU = on_gpu_or_interpreter()

from compiler.kernels import router  # noqa: E402
from compiler.ops import router_topk  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"


def reference(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's torch version (CPU scores never reach the kernel)."""
    return router_topk(scores.cpu(), k, 1, 1)


def test_a_hand_worked_row_best_first_ties_to_the_lower_index():
    # 0.7 (expert 5), then 0.5 twice (experts 0 and 2, the lower first), then -0 and +0 tie (expert 1 before 3)
    s = torch.tensor([[0.5, -0.0, 0.5, 0.0, -1.0, 0.7]], device=DEV)
    idx, counts = router.router_topk(s, 4)
    assert idx.tolist() == [[5, 0, 2, 1]] and idx.dtype == torch.int64
    assert counts.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("N,E,k", [(70, 64, 6), (33, 48, 8), (5, 7, 7), (1, 256, 1)])
def test_random_and_tied_scores_match_the_torch_version(N, E, k):
    g = torch.Generator().manual_seed(N + E)
    s = torch.rand(N, E, generator=g)
    s[::3] = torch.randint(0, 3, (len(s[::3]), E), generator=g).float() / 4       # many ties
    s[-1, : E // 2] = float("-inf")                                                # masked experts
    idx, counts = router.router_topk(s.to(DEV), k)
    want_idx, want_counts = reference(s, k)
    assert torch.equal(idx.cpu(), want_idx)
    assert torch.equal(counts.cpu(), want_counts) and counts.sum().item() == N * k


def test_no_rows_and_strided_scores():
    idx, counts = router.router_topk(torch.empty(0, 16, device=DEV), 2)
    assert idx.shape == (0, 2) and counts.tolist() == [0.0] * 16
    wide = torch.rand(9, 40, generator=torch.Generator().manual_seed(3))
    s = wide[:, :20]                                                               # row stride 40
    idx, _ = router.router_topk(s.to(DEV), 3)
    assert torch.equal(idx.cpu(), reference(s, 3)[0])
