"""expert_dispatch / expert_combine in one process (no exchange): the routed-expert math and the capacity rule.

The exchanges themselves run on several processes in tests/runtime/test_distributed_expert.py.
"""

import torch

import compiler.ops  # noqa: F401
from compiler.ops.experts import expert_ffn

ops = torch.ops.grapefx


def _weights(E, C, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.3).requires_grad_() for s in ((E, C, F), (E, C, F), (E, F, C))]


def _through_dispatch(x, idx, gates, ws, capacity_factor=0.0):
    rows, local, order, splits, dropped = ops.expert_dispatch(x, idx, ws[0].shape[0], 1, "", capacity_factor)
    y = ops.expert_ffn(rows, local.view(-1, 1), torch.ones(rows.shape[0], 1), *ws)
    return ops.expert_combine(y, gates, order, splits, "")[0], dropped, splits


def test_dispatch_ffn_combine_equals_expert_ffn_with_gradients_and_an_empty_expert():
    torch.manual_seed(0)
    N, C, F, E = 7, 8, 12, 4
    x = torch.randn(N, C, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, 0], [2, 0], [0, 2], [1, 2], [2, 1], [0, 1]])      # expert 3 gets no token
    gates = torch.rand(N, 2, requires_grad=True)
    ws = _weights(E, C, F)
    out, dropped, splits = _through_dispatch(x, idx, gates, ws)
    want = expert_ffn(x, idx, gates, *ws)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert dropped.item() == 0 and splits.tolist() == [[14], [14]]
    g = torch.randn(N, C)
    got = torch.autograd.grad(out, [x, gates, *ws], g)
    ref = torch.autograd.grad(want, [x, gates, *ws], g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[-1][3].abs().sum() == 0                                          # the idle expert: no gradient


def test_capacity_keeps_each_experts_first_assignments_in_token_order():
    # N = 6 tokens, K = 1, X = 2 experts: the even share N*K/X = 3; factor 2/3 -> capacity ceil(2) = 2
    x = torch.arange(1, 7, dtype=torch.float32)[:, None].repeat(1, 4)              # token t's row is all t + 1
    idx = torch.tensor([[0], [0], [0], [0], [1], [0]])                             # expert 0 gets 5, keeps tokens 0, 1
    ws = [torch.eye(4).repeat(2, 1, 1)] * 3                                        # identity-like experts
    out, dropped, splits = _through_dispatch(x, idx, torch.ones(6, 1), ws, capacity_factor=2 / 3)
    assert dropped.item() == 3                                                     # tokens 2, 3, 5 over capacity
    assert splits.tolist() == [[3], [3]]                                           # 2 + 1 rows kept
    assert out[[2, 3, 5]].abs().sum() == 0 and (out[[0, 1, 4]].abs().sum(1) > 0).all()
