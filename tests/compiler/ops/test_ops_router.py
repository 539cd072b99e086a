"""The router's expert selection (MATH.md §5): ties to the lower index, group-limited routing, counts."""

import importlib

import pytest
import torch

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.ops import router_topk
from ops_testing import assert_opcheck


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1],
                           [0.2, 0.2, 0.2, 0.2, 0.2]])
    idx, counts = router_topk(scores, 3, 1, 1)
    assert idx.tolist() == [[1, 3, 0], [0, 1, 2]]
    assert idx.dtype == torch.int64
    assert counts.tolist() == [2.0, 2.0, 1.0, 1.0, 0.0]


def test_ties_in_wide_rows():
    # 64 experts all tied (e.g. sigmoid scores saturated): the first k, in order, on every row
    idx, _ = router_topk(torch.zeros(300, 64), 8, 1, 1)
    assert (idx == torch.arange(8)).all()
    # equal pairs scattered among distinct values: the lower index of each pair comes first
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 2.0] * 8])
    idx, _ = router_topk(scores, 6, 1, 1)
    assert idx.tolist() == [[0, 2, 6, 8, 12, 14]]


def test_ties_signs_and_zeros_match_the_stable_sort():
    # the fp32 path (top-k over tie-free int64 keys) against the rule's definition, a stable descending
    # sort: scores drawn from few values (many ties), negatives, -0.0 next to +0.0, tiny and huge magnitudes
    g = torch.Generator().manual_seed(3)
    values = torch.tensor([-3.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.25000003, 7.0, 3e38, -3e38])
    scores = values[torch.randint(0, len(values), (400, 64), generator=g)]
    for k in (1, 6, 64):
        idx, _ = router_topk(scores, k, 1, 1)
        want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(idx, want)
    idx, _ = router_topk(torch.tensor([[-0.0, 0.0, -0.0]]), 3, 1, 1)
    assert idx.tolist() == [[0, 1, 2]]                               # -0 and +0 tie: index order


def test_distinct_scores_match_topk():
    torch.manual_seed(0)
    scores = torch.rand(50, 16)
    idx, _ = router_topk(scores, 4, 1, 1)
    assert torch.equal(idx, torch.topk(scores, 4).indices)


def test_group_limited_routing_by_hand():
    # 8 experts in 4 groups of 2, k = 4, keep group_topk = 2 groups; group score = sum of its top 4 // 2 = 2
    #   group 0: {0.9375, 0}     -> 0.9375   (would win on the max alone)
    #   group 1: {0.5, 0.5}      -> 1.0      (ties group 2, lower index wins)
    #   group 2: {0.75, 0.25}    -> 1.0
    #   group 3: {0.625, 0.4375} -> 1.0625
    scores = torch.tensor([[0.9375, 0.0, 0.5, 0.5, 0.75, 0.25, 0.625, 0.4375]])
    idx, counts = router_topk(scores, 4, 4, 2)
    assert idx.tolist() == [[6, 2, 3, 7]]                       # experts 2 and 3 tie: 2 first
    assert counts.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    # without the group limit the plain top-4 differs
    assert router_topk(scores, 4, 1, 1)[0].tolist() == [[0, 4, 6, 2]]


def test_group_limited_one_group_per_token():
    # k // group_topk = 2 with group_topk = 1: only the best group's experts may be chosen
    scores = torch.tensor([[0.1, 0.2, 0.9, 0.0, 0.6, 0.5],      # groups {0,1,2}: 1.1, {3,4,5}: 1.1 -> group 0
                           [0.1, 0.2, 0.3, 0.0, 0.6, 0.5]])     # group 1 (1.1 > 0.5)
    idx, counts = router_topk(scores, 2, 2, 1)
    assert idx.tolist() == [[2, 1], [4, 5]]
    assert counts.tolist() == [0, 1, 1, 0, 1, 1]


@pytest.mark.parametrize("groups, group_topk", [(1, 1), (4, 2)])
def test_counts_sum_to_tokens_times_k(groups, group_topk):
    torch.manual_seed(1)
    scores = torch.rand(37, 16)
    idx, counts = router_topk(scores, 4, groups, group_topk)
    assert counts.dtype == torch.float32 and counts.shape == (16,)
    assert counts.sum().item() == 37 * 4
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=16).float())
    assert all(len(set(row)) == 4 for row in idx.tolist())     # k distinct experts per token


def test_no_gradient_through_selection():
    scores = torch.rand(5, 8, requires_grad=True)
    idx, counts = router_topk(scores, 2, 1, 1)
    assert not idx.requires_grad and not counts.requires_grad
    torch.gather(scores, 1, idx).sum().backward()                # gates still reach the scores
    assert scores.grad.sum().item() == 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    scores = torch.rand(6, 8, dtype=dtype, requires_grad=True)
    assert_opcheck(torch.ops.grapefx.router_select.default, (scores, 3, 1, 1))
    assert_opcheck(torch.ops.grapefx.router_select.default, (scores, 4, 4, 2))


@pytest.mark.parametrize("k, groups, group_topk, match", [
    (9, 1, 1, "1 <= k <= E"),
    (2, 3, 1, "do not split into 3 equal groups"),
    (2, 4, 5, "group_topk <= num_groups"),
    (6, 4, 2, "hold fewer than k"),
])
def test_rejects_impossible_settings(k, groups, group_topk, match):
    with pytest.raises(ValueError, match=match):
        router_topk(torch.rand(2, 8), k, groups, group_topk)


def test_the_registered_traced_kernel_takes_detached_scores_after_the_checks(monkeypatch):
    """Where the traced kernel applies (CUDA there; forced here), ``router_topk`` hands it the scores
    without their gradient, after the same argument checks as the opaque op."""
    router_module = importlib.import_module("compiler.ops.router")
    seen = []

    def traced(scores, k):
        seen.append((scores.requires_grad, k))
        return torch.zeros(scores.shape[0], k, dtype=torch.int64), torch.zeros(scores.shape[1])

    monkeypatch.setattr(router_module, "_traced_topk", traced)
    monkeypatch.setattr(router_module, "_kernel_applies", lambda scores, num_groups: True)
    scores = torch.rand(5, 8, requires_grad=True)
    idx, counts = router_topk(scores, 2, 1, 1)
    assert seen == [(False, 2)] and idx.shape == (5, 2) and counts.shape == (8,)
    with pytest.raises(ValueError, match="1 <= k <= E"):
        router_topk(scores, 9, 1, 1)
    assert len(seen) == 1


def test_a_vector_of_scores_gets_the_ops_error_where_the_kernel_is_registered(monkeypatch):
    """The argument checks come before the kernel's dispatch reads the scores' shape (as on CUDA)."""
    router_module = importlib.import_module("compiler.ops.router")
    monkeypatch.setattr(router_module, "_traced_topk", lambda s, k: None)
    monkeypatch.setattr(router_module, "_kernel_applies", lambda scores, num_groups: scores.shape[1] <= 256)
    with pytest.raises(ValueError, match=r"choice_scores must be a float \(N, E\) matrix, got \(8,\)"):
        router_topk(torch.rand(8), 2, 1, 1)
