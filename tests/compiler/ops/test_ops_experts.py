"""The routed expert FFN (MATH.md §5) against a per-token loop written here; gradients."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.ops import expert_ffn
from ops_testing import assert_opcheck, rel_err

experts_module = importlib.import_module("compiler.ops.experts")
F64 = torch.float64


def per_token_loop(x, indices, gates, w_gate, w_up, w_down):
    """out_t = sum_k g_tk (silu(x_t Wg_e) * (x_t Wu_e)) Wd_e, one token and slot at a time."""
    rows = []
    for t in range(x.shape[0]):
        acc = 0
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            acc = acc + gates[t, k] * ((F.silu(x[t] @ w_gate[e]) * (x[t] @ w_up[e])) @ w_down[e])
        rows.append(acc)
    return torch.stack(rows)


def make(N=9, C=8, F_=16, E=4, K=2, dtype=F64, seed=0, grad=False, skip_expert=None):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: (torch.randn(*shape, generator=g, dtype=F64) * 0.5).to(dtype).requires_grad_(grad)
    scores = torch.rand(N, E, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1.0                            # nobody routes there
    indices = torch.topk(scores, K).indices
    return t(N, C), indices, t(N, K), t(E, C, F_), t(E, C, F_), t(E, F_, C)


@pytest.mark.parametrize("C, F_", [(8, 16), (6, 10)])            # aligned (grouped matmul) / unaligned
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_matches_per_token_loop(C, F_, dtype):
    x, idx, gates, wg, wu, wd = make(C=C, F_=F_, dtype=dtype, skip_expert=1)
    out = expert_ffn(x, idx, gates, wg, wu, wd)
    assert out.shape == x.shape and out.dtype == dtype
    ref = per_token_loop(*(t.double() for t in (x, idx, gates, wg, wu, wd)))
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-14)


def test_grouped_matmul_path_agrees_with_per_expert_matmuls():
    if not experts_module._grouped_mm_works():
        pytest.skip("this torch has no CPU torch._grouped_mm")
    x, idx, gates, wg, wu, wd = make(dtype=torch.float32, grad=True, skip_expert=0)
    counts = torch.bincount(idx.flatten(), minlength=4)
    assert experts_module._Groups(counts, torch.float32, 8, 16).grouped
    out = expert_ffn(x, idx, gates, wg, wu, wd)
    grads = torch.autograd.grad(out.square().sum(), (x, gates, wg, wu, wd))
    x64, g64, wg64, wu64, wd64 = (t.detach().double().requires_grad_(True) for t in (x, gates, wg, wu, wd))
    ref = per_token_loop(x64, idx, g64, wg64, wu64, wd64)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x64, g64, wg64, wu64, wd64))
    assert rel_err(out, ref) < 1e-6
    for name, a, b in zip(["x", "gates", "w_gate", "w_up", "w_down"], grads, ref_grads):
        assert rel_err(a, b) < 1e-5, name


def test_low_precision_inputs():
    x, idx, gates, wg, wu, wd = make(N=16, C=16, F_=32, dtype=torch.float32)
    out = expert_ffn(*(t if t.dtype == torch.int64 else t.bfloat16() for t in (x, idx, gates, wg, wu, wd)))
    assert out.dtype == torch.bfloat16
    assert rel_err(out, per_token_loop(x, idx, gates, wg, wu, wd)) < 2e-2


def test_gradcheck():
    x, idx, gates, wg, wu, wd = make(N=5, C=3, F_=4, E=3, K=2, grad=True)
    assert torch.autograd.gradcheck(lambda *a: expert_ffn(a[0], idx, *a[1:]), (x, gates, wg, wu, wd))


def test_gradients_match_per_token_loop_fp64():
    x, idx, gates, wg, wu, wd = make(grad=True, skip_expert=2)
    g = torch.randn(9, 8, dtype=F64)
    got = torch.autograd.grad(expert_ffn(x, idx, gates, wg, wu, wd), (x, gates, wg, wu, wd), g)
    want = torch.autograd.grad(per_token_loop(x, idx, gates, wg, wu, wd), (x, gates, wg, wu, wd), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert got[2][2].abs().max() == 0                            # an idle expert gets no gradient


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_opcheck(dtype):
    x, idx, gates, wg, wu, wd = make(N=6, dtype=dtype, grad=True)
    assert_opcheck(torch.ops.grapefx.expert_ffn.default, (x, idx, gates, wg, wu, wd))
    g = torch.randn(6, 8, dtype=dtype)
    assert_opcheck(torch.ops.grapefx.expert_ffn_backward.default,
                   (g, *(t.detach() for t in (x, idx, gates, wg, wu, wd))))


def test_rejects_out_of_range_expert():
    x, idx, gates, wg, wu, wd = make()
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        expert_ffn(x, idx + 3, gates, wg, wu, wd)
