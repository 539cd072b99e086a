"""The fused attention op's optional dense ``bias`` (what ``attention_formation`` folds an explicit
additive score bias into): value, broadcasting, gradients, the blockwise path, and that a call with
a bias never reaches registered CUDA kernels."""

import importlib

import pytest
import torch

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.ops import attention
from ops_testing import assert_opcheck

attn_module = importlib.import_module("compiler.ops.attention")
F64 = torch.float64


def dense_reference(q, k, v, bias, window, scale, slopes=None):
    """softmax(scale q k^T - m_h (i - j) + bias, masked) v with K/V repeated per query head; fp64."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).double()             # i - j
    s = scale * q @ k.transpose(-1, -2) + bias                                        # (B, Hq, T, T)
    if slopes is not None:
        s = s - slopes[:, None, None] * dist
    visible = dist >= 0
    if window:
        visible &= dist <= window - 1
    return torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ v


def inputs(B=2, Hq=4, Hkv=2, T=9, D=8, bias_shape=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).requires_grad_(grad)
    return t(B, Hq, T, D), t(B, Hkv, T, D), t(B, Hkv, T, D), t(*(bias_shape or (Hq, T, T)))


@pytest.mark.parametrize("bias_shape", [(4, 9, 9), (9, 9), (1, 9, 9), (4, 1, 9), (4, 9, 1)])
@pytest.mark.parametrize("window", [0, 3])
def test_bias_is_added_after_scaling(bias_shape, window):
    q, k, v, bias = inputs(bias_shape=bias_shape)
    out = attention(q, k, v, None, None, window, 0.35, bias)
    torch.testing.assert_close(out, dense_reference(q, k, v, bias, window, 0.35), rtol=0, atol=1e-12)


def test_bias_adds_to_slopes():
    q, k, v, bias = inputs()
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=F64)
    out = attention(q, k, v, None, slopes, 0, 0.35, bias)
    torch.testing.assert_close(out, dense_reference(q, k, v, bias, 0, 0.35, slopes), rtol=0, atol=1e-12)


def test_alibi_bias_equals_slopes():
    # the rewrite bias_softmax relies on: a dense alibi_bias(slopes, T, T) == in-kernel slopes
    q, k, v, _ = inputs()
    slopes = torch.tensor(compiler.ops.alibi_slopes(4), dtype=F64)
    dense = attention(q, k, v, None, None, 0, 0.35, torch.ops.grapefx.alibi_bias(slopes, 9, 9))
    torch.testing.assert_close(dense, attention(q, k, v, None, slopes, 0, 0.35), rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", ["dense", "blockwise"])
@pytest.mark.parametrize("bias_shape, window", [((2, 5, 5), 0), ((5, 5), 2), ((2, 1, 5), 3)])
def test_gradcheck_with_bias(path, bias_shape, window, monkeypatch):
    if path == "blockwise":
        monkeypatch.setattr(attn_module, "DENSE_MAX_T", 0)
        monkeypatch.setattr(attn_module, "BLOCK_Q", 2)
        monkeypatch.setattr(attn_module, "BLOCK_K", 3)
    q, k, v, bias = inputs(B=1, Hq=2, Hkv=1, T=5, D=4, bias_shape=bias_shape, grad=True)
    theta = torch.tensor([0.7, 0.2], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, th, b: attention(q, k, v, th, None, window, 0.5, b),
                                    (q, k, v, theta, bias))


def test_blockwise_with_bias_equals_dense(monkeypatch):
    q, k, v, bias = inputs(T=23, bias_shape=(4, 23, 23), grad=True)
    want = dense_reference(q, k, v, bias, 5, 0.35)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v, bias), g)
    monkeypatch.setattr(attn_module, "DENSE_MAX_T", 0)
    monkeypatch.setattr(attn_module, "BLOCK_Q", 4)
    monkeypatch.setattr(attn_module, "BLOCK_K", 6)
    out = attention(q, k, v, None, None, 5, 0.35, bias)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    for name, a, b in zip("q k v bias".split(), torch.autograd.grad(out, (q, k, v, bias), g), want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=name)


def test_bias_shape_is_checked():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match=r"broadcastable to \(Hq, T, T\) = \(4, 9, 9\)"):
        attention(q, k, v, None, None, 0, 0.35, torch.zeros(2, 9, 9, dtype=F64))
    with pytest.raises(ValueError, match="broadcastable"):
        attention(q, k, v, None, None, 0, 0.35, torch.zeros(2, 4, 9, 9, dtype=F64))


def test_opcheck_with_bias():
    q, k, v, bias = inputs(B=1, T=6, D=4, grad=True, bias_shape=(4, 6, 6))
    assert_opcheck(torch.ops.grapefx.attention.default, (q, k, v, None, None, 2, 0.5, bias))
    assert_opcheck(torch.ops.grapefx.attention_fwd.default, (q, k, v, None, None, 2, 0.5, bias))
    out, lse = torch.ops.grapefx.attention_fwd(q, k, v, None, None, 2, 0.5, bias)
    detached = [t.detach() for t in (q, k, v, out, lse)]
    assert_opcheck(torch.ops.grapefx.attention_bwd.default,
                   (torch.randn_like(out), *detached, None, None, 2, 0.5, bias.detach()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_never_see_a_bias(monkeypatch):
    calls = []

    def fwd(*args):
        calls.append(len(args))
        return attn_module._forward_ref(*args)

    def bwd(*args):
        calls.append(len(args))
        return attn_module._backward_ref(*args)

    q, k, v, bias = (t.float().cuda().requires_grad_(True) for t in inputs())
    monkeypatch.setattr(attn_module, "_cuda_kernels", None)      # restored after the test
    monkeypatch.setattr(attn_module, "_traced_kernels", None)
    attn_module.register_cuda_impl(fwd, bwd)
    attention(q, k, v, None, None, 0, 0.35, bias).sum().backward()
    assert calls == []                                       # the reference ran, with the bias
    attention(q, k, v, None, None, 0, 0.35).sum().backward()
    assert calls == [7, 10]                                  # bias-free calls keep the kernels' signature
    assert bias.grad is not None
