"""The fused attention op (MATH.md §1–§3) against a dense masked softmax written here in fp64:
windows, GRAPE-M in-kernel rotation, ALiBi slopes, GQA, the blockwise path, gradients."""

import importlib

import pytest
import torch

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.ops import attention
from ops_testing import assert_opcheck, rel_err

attn_module = importlib.import_module("compiler.ops.attention")   # the package attribute is the op wrapper
F64 = torch.float64


def dense_reference(q, k, v, theta, slopes, window, scale):
    """softmax(scale q k^T - m_h (i - j), masked) v, with K/V repeated per query head; fp64."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    if theta is not None:   # RoPE as rotate_half at positions 0..T-1
        freqs = torch.cat([torch.outer(torch.arange(T, dtype=F64), theta.double())] * 2, dim=-1)   # (T, D)
        rot = lambda x: x * freqs.cos() + torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1) * freqs.sin()
        q, k = rot(q), rot(k)
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).double()              # i - j
    s = scale * q @ k.transpose(-1, -2)                                                # (B, Hq, T, T)
    if slopes is not None:
        s = s - slopes.double()[:, None, None] * dist
    visible = dist >= 0
    if window:
        visible &= dist <= window - 1
    return torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ v


def inputs(B=2, Hq=4, Hkv=2, T=11, D=8, dtype=F64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)
    theta = (torch.rand(D // 2, generator=g, dtype=F64) * 0.8 + 0.1).to(dtype).requires_grad_(grad)
    slopes = (torch.rand(Hq, generator=g, dtype=F64) * 0.5).to(dtype).requires_grad_(grad)
    return t(B, Hq, T, D), t(B, Hkv, T, D), t(B, Hkv, T, D), theta, slopes


@pytest.fixture
def blockwise(monkeypatch):
    """Force the blockwise path: query blocks of 4 rows, key blocks of 6."""
    monkeypatch.setattr(attn_module, "DENSE_MAX_T", 0)
    monkeypatch.setattr(attn_module, "BLOCK_Q", 4)
    monkeypatch.setattr(attn_module, "BLOCK_K", 6)


@pytest.mark.parametrize("window", [1, 4, 11, 30, 0])
@pytest.mark.parametrize("rotate, bias", [(True, False), (False, True), (True, True), (False, False)])
def test_matches_dense_reference(window, rotate, bias):
    q, k, v, theta, slopes = inputs()
    theta, slopes = theta if rotate else None, slopes if bias else None
    out = attention(q, k, v, theta, slopes, window, 0.35)
    assert out.shape == q.shape and out.dtype == F64
    torch.testing.assert_close(out, dense_reference(q, k, v, theta, slopes, window, 0.35), rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [1, 4, 8])
def test_query_sees_exactly_its_window(window):
    # d out_i / d v_j is nonzero exactly for i - W + 1 <= j <= i
    T = 8
    q, k, v, _, _ = inputs(B=1, Hq=2, Hkv=1, T=T)
    v.requires_grad_(True)
    for i in range(T):
        v.grad = None
        attention(q, k, v, None, None, window, 0.35)[:, :, i].sum().backward()
        seen = (v.grad.abs().sum((0, 1, 3)) > 0).nonzero().flatten().tolist()
        assert seen == list(range(max(0, i - window + 1), i + 1)), (i, seen)


def test_window_one_returns_own_value():
    # W = 1: each query sees only itself, so out_i = v_i of its KV head (h // G)
    q, k, v, theta, slopes = inputs(Hq=4, Hkv=2)
    out = attention(q, k, v, theta, slopes, 1, 0.35)
    torch.testing.assert_close(out, v.repeat_interleave(2, 1), rtol=0, atol=1e-15)


@pytest.mark.parametrize("window", [0, 3, 4, 9, 40])
def test_blockwise_equals_dense(window, blockwise):
    q, k, v, theta, slopes = inputs(T=23, grad=True)
    dense = dense_reference(q, k, v, theta, slopes, window, 0.35)
    out = attention(q, k, v, theta, slopes, window, 0.35)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, theta, slopes), g)
    want = torch.autograd.grad(dense, (q, k, v, theta, slopes), g)
    for name, a, b in zip("q k v theta slopes".split(), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=name)


def test_blockwise_visits_only_window_blocks():
    # each query block reads at most BLOCK_Q + W - 1 keys: sliding-window cost O(T (W + BLOCK_Q))
    T, W, bq, bk = 4096, 128, 128, 512
    visited = sum(ke - ks for qs, qe in attn_module._query_blocks(T, bq)
                  for ks, ke, _ in attn_module._key_blocks(qs, qe, W, bk))
    assert visited == 128 + (T // bq - 1) * (bq + W - 1)
    causal = sum(ke - ks for qs, qe in attn_module._query_blocks(T, bq)
                 for ks, ke, _ in attn_module._key_blocks(qs, qe, 0, bk))
    assert causal == sum(range(bq, T + 1, bq))   # causal: keys 0..qe-1, never the future
    # a window much shorter than T takes the blockwise path even below DENSE_MAX_T
    assert attn_module._block_sizes(1024, 128) == (attn_module.BLOCK_Q, attn_module.BLOCK_K)
    assert attn_module._block_sizes(1024, 0) == (1024, 1024)


def test_returns_logsumexp():
    q, k, v, theta, slopes = inputs()
    out, lse = torch.ops.grapefx.attention_fwd(q, k, v, theta, slopes, 4, 0.35)
    assert lse.shape == (2, 4, 11) and lse.dtype == F64
    # rebuild the scores: softmax(S) @ v = out and logsumexp(S) = lse
    G, T, D = 2, 11, 8
    freqs = torch.cat([torch.outer(torch.arange(T, dtype=F64), theta)] * 2, dim=-1)
    rot = lambda x: x * freqs.cos() + torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1) * freqs.sin()
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).double()
    s = 0.35 * rot(q) @ rot(k.repeat_interleave(G, 1)).transpose(-1, -2) - slopes[:, None, None] * dist
    s = s.masked_fill((dist < 0) | (dist > 3), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("path", ["dense", "blockwise"])
def test_gradcheck(window, path, monkeypatch):
    if path == "blockwise":
        monkeypatch.setattr(attn_module, "DENSE_MAX_T", 0)
        monkeypatch.setattr(attn_module, "BLOCK_Q", 2)
        monkeypatch.setattr(attn_module, "BLOCK_K", 3)
    q, k, v, theta, slopes = inputs(B=1, Hq=2, Hkv=1, T=5, D=4, grad=True)
    assert torch.autograd.gradcheck(lambda *a: attention(*a, window, 0.5), (q, k, v, theta, slopes))
    assert torch.autograd.gradcheck(lambda *a: attention(*a, None, None, window, 0.5), (q, k, v))


def test_low_precision_inputs():
    q, k, v, theta, slopes = inputs(T=40, D=16, dtype=torch.float32)
    theta = theta.float()
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), theta, slopes, 8, 0.25)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, dense_reference(q, k, v, theta, slopes, 8, 0.25)) < 2e-2          # MATH.md §6
    out32 = attention(q, k, v, theta, slopes, 8, 0.25)
    assert rel_err(out32, dense_reference(q, k, v, theta, slopes, 8, 0.25)) < 1e-5


def test_noncontiguous_inputs():
    # the lowering hands over (B, T, H, D) projections transposed to (B, H, T, D)
    q, k, v, theta, slopes = inputs()
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    torch.testing.assert_close(attention(qt, kt, vt, theta, slopes, 3, 0.35), attention(q, k, v, theta, slopes, 3, 0.35),
                               rtol=0, atol=0)


def test_default_scale():
    q, k, v, _, _ = inputs()
    torch.testing.assert_close(attention(q, k, v), dense_reference(q, k, v, None, None, 0, 8 ** -0.5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    q, k, v, theta, slopes = inputs(B=1, Hq=4, Hkv=2, T=6, D=4, dtype=dtype, grad=True)
    for args in [(q, k, v, theta, slopes, 3, 0.5), (q, k, v, None, None, 0, 0.5), (q, k, v, theta, None, 2, 0.5)]:
        assert_opcheck(torch.ops.grapefx.attention.default, args)
        assert_opcheck(torch.ops.grapefx.attention_fwd.default, args)
    out, lse = torch.ops.grapefx.attention_fwd(q, k, v, theta, slopes, 3, 0.5)
    g = torch.randn_like(out)
    detached = [t.detach() for t in (q, k, v, out, lse, theta, slopes)]
    assert_opcheck(torch.ops.grapefx.attention_bwd.default, (g, *detached, 3, 0.5))


def test_rejects_bad_head_counts():
    q, k, v, _, _ = inputs(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention(q, k, v)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_dispatches_to_registered_kernels(monkeypatch):
    calls = []

    def fwd(*args):
        calls.append("fwd")
        return attn_module._forward_ref(*args)

    def bwd(*args):
        calls.append("bwd")
        return attn_module._backward_ref(*args)

    monkeypatch.setattr(attn_module, "_cuda_kernels", None)
    monkeypatch.setattr(attn_module, "_traced_kernels", None)
    attn_module.register_cuda_impl(fwd, bwd)
    q, k, v, theta, slopes = (t.cuda().requires_grad_(True) for t in inputs(dtype=torch.float32))
    attention(q, k, v, theta, slopes, 4, 0.35).sum().backward()
    assert calls == ["fwd", "bwd"]


@needs_cuda
@pytest.mark.parametrize("window", [0, 5])
def test_cuda_without_kernels_runs_the_reference(window, monkeypatch, blockwise):
    monkeypatch.setattr(attn_module, "_cuda_kernels", None)
    monkeypatch.setattr(attn_module, "_traced_kernels", None)
    q, k, v, theta, slopes = inputs(T=23, dtype=torch.float32, grad=True)
    cuda = [t.detach().cuda().requires_grad_(True) for t in (q, k, v, theta, slopes)]
    out = attention(*cuda, window, 0.35)
    assert rel_err(out.cpu(), dense_reference(q, k, v, theta, slopes, window, 0.35)) < 1e-5
    g = torch.randn(out.shape)
    got = torch.autograd.grad(out, cuda, g.cuda())
    want = torch.autograd.grad(attention(q, k, v, theta, slopes, window, 0.35), (q, k, v, theta, slopes), g)
    for a, b in zip(got, want):
        assert rel_err(a.cpu(), b) < 1e-5
